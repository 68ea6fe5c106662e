"""Run a benchmark from its declarative spec in ``bench/experiments/`` (TOML), or render the results table.

A spec names a script of ``bench/`` and its arguments; the script writes ``bench/results/NAME.json`` with the
commit, the full config and the machine. A spec with ``render`` lists result files and the documents the results
table is written into. From ``bench/``, with ``PYTHONPATH=..``::

    python run.py experiments/r20_05.toml            # the 6-seed ResNet-20 run behind the headline table
    python run.py experiments/r20_05.toml --dry-run  # print the command only
    python run.py experiments/results.toml           # render the table into README.md and docs/results.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    raise SystemExit("bench/run.py reads its specs with tomllib: Python 3.11 or later") from None

BENCH = Path(__file__).resolve().parent


def flags(args: dict) -> list[str]:
    """Command-line flags of a spec's ``[args]``: lists as repeated values, ``true`` as the bare flag, ``false``
    as ``--no-`` the flag."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + flag[2:])
        elif isinstance(value, list):
            out += [flag, *map(str, value)] if value else [flag]
        else:
            out += [flag, str(value)]
    return out


def command(spec: dict, path: Path) -> list[str]:
    """The script invocation a spec describes: ``script``, its ``positional`` arguments, ``[args]`` as flags and
    ``--name NAME`` (the result file); or ``render_methods.py`` for a spec with ``render`` and ``write``."""
    if "render" in spec:
        plot = ["--plot", spec["plot"]] if "plot" in spec else []
        unseen = ["--unseen", *spec["unseen"]] if spec.get("unseen") else []
        return [sys.executable, "render_methods.py", *spec["render"], "--write", *spec.get("write", []), *plot,
                *unseen]
    unknown = set(spec) - {"description", "script", "name", "positional", "args", "measured"}
    if unknown:
        raise SystemExit(f"{path}: unknown keys {sorted(unknown)} (a spec has script, name, positional, args, "
                         "description and measured)")
    script = BENCH / f"{spec.get('script', '')}.py"
    if "script" not in spec or not script.is_file():
        raise SystemExit(f"{path}: script must name a benchmark of bench/, got {spec.get('script')!r}")
    name = ["--name", spec["name"]] if "name" in spec else []
    return [sys.executable, script.name, *map(str, spec.get("positional", [])), *flags(spec.get("args", {})), *name]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("spec", type=Path, help="TOML file in bench/experiments/")
    p.add_argument("--dry-run", action="store_true", help="print the command without running it")
    args = p.parse_args()
    try:
        spec = tomllib.loads(args.spec.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"cannot read spec {args.spec}: {e}") from None
    cmd = command(spec, args.spec)
    print(" ".join(cmd[1:]), flush=True)
    if not args.dry_run:
        raise SystemExit(subprocess.run(cmd, cwd=BENCH).returncode)


if __name__ == "__main__":
    main()
