"""The benchmark specs in bench/experiments/ parse and name scripts that exist (bench/run.py)."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import run  # noqa: E402 - bench/run.py, not a package

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def test_flags_follow_argparse_conventions():
    assert run.flags({"models": ["resnet20"], "random_seeds": [0, 1], "latency": False, "json": True,
                      "workers": 2, "skip": []}) == ["--models", "resnet20", "--random-seeds", "0", "1",
                                                     "--no-latency", "--json", "--workers", "2", "--skip"]


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
@pytest.mark.parametrize("spec", sorted((BENCH / "experiments").glob("*.toml")), ids=lambda p: p.stem)
def test_every_spec_builds_a_command(spec):
    data = tomllib.loads(spec.read_text())
    cmd = run.command(data, spec)
    assert (BENCH / cmd[1]).is_file()
    checks = data.get("unseen", [])
    for name in data.get("render", []) + checks:
        assert (BENCH / "results" / f"{name}.json").is_file(), name  # the rendered table's result files exist
    if checks:
        assert cmd[cmd.index("--unseen") + 1:] == checks


def test_a_spec_with_unknown_keys_is_refused():
    with pytest.raises(SystemExit, match="unknown keys"):
        run.command({"script": "methods", "name": "x", "arg": {}}, Path("bad.toml"))
    with pytest.raises(SystemExit, match="script must name a benchmark"):
        run.command({"script": "nope", "name": "x"}, Path("bad.toml"))


def test_pareto_front_keeps_the_points_no_other_beats_on_both():
    import render_methods
    points = [(1.0, 80.0), (1.2, 79.0), (1.1, 78.0), (1.2, 81.0), (0.9, 85.0), (0.9, 84.0)]
    assert render_methods.pareto(points) == [(1.2, 81.0), (0.9, 85.0)]


def test_runs_of_other_seeds_are_pooled_and_the_same_seeds_replaced():
    import render_methods
    early = ({"runs": [{"seed": 0, "acc_test": 60.0}, {"seed": 1, "acc_test": 62.0}]}, "aaaaaaa", {1: 1.5})
    late = ({"runs": [{"seed": 2, "acc_test": 64.0}]}, "bbbbbbb", {0: 1.2})
    entry, commit, timed = render_methods.pooled(early, late)
    assert [r["seed"] for r in entry["runs"]] == [0, 1, 2] and commit == "aaaaaaa+bbbbbbb" and timed == {1: 1.5, 2: 1.2}
    assert render_methods.pooled(early, ({"runs": [{"seed": 1, "acc_test": 1.0}]}, "c", {}))[1] == "c"
    assert render_methods.pooled(({"acc_test": 1.0}, "d", {}), late) == late
    again = ({"runs": [{"seed": 3, "acc_test": 65.0}]}, "bbbbbbb", {})
    assert render_methods.pooled((entry, commit, timed), again)[1] == "aaaaaaa+bbbbbbb"  # a commit appears once


def test_train_run_with_other_flags_gets_its_own_row(tmp_path, monkeypatch):
    import render_methods
    monkeypatch.setattr(render_methods, "RESULTS", tmp_path)
    for name, config in (("a", {}), ("b", {"train_granularity": "group"}), ("c", {"train_evaluations": 120}),
                         ("d", {"train_evaluations": 120, "train_sensitivity_points": 5})):
        runs = {"train": {"runs": [{"seed": 0, "acc_test": 70.0}]}}
        (tmp_path / f"{name}.json").write_text(json.dumps({"commit": "abc1234", "config": config,
                                                            "models": {"m": {"0.5": runs}}}))
    assert list(render_methods.merged(["a", "b", "c", "d"])[("m", "0.5")]) == ["train", "train-group", "train-120",
                                                                               "train-120-5pt"]


def test_the_table_orders_blocks_by_model_then_budget_whatever_the_file_order(tmp_path, monkeypatch):
    import render_methods
    monkeypatch.setattr(render_methods, "RESULTS", tmp_path)
    for name, (model, target) in (("a", ("m56", "0.5")), ("b", ("m56", "0.3")), ("c", ("m20", "0.4"))):
        models = {model: {target: {"uniform": {"acc_test": 70.0}}}}
        (tmp_path / f"{name}.json").write_text(json.dumps({"commit": "abc1234", "config": {}, "models": models}))
    blocks = [line.split(" | ")[:2] for line in render_methods.rows(["a", "b", "c"])[2:]]
    assert blocks == [["| m20", "0.4"], ["| m56", "0.3"], ["| m56", "0.5"]]


def test_the_unseen_column_shows_only_a_check_of_the_rows_own_seeds():
    import render_methods
    entry = {"runs": [{"seed": 0, "acc_test": 60.0}, {"seed": 1, "acc_test": 62.0}]}
    checked = {"acc_unseen": 55.5, "runs": [{"seed": 1}, {"seed": 0}]}
    assert render_methods.unseen_cell(entry, checked) == "55.50"
    assert render_methods.unseen_cell(entry, {"acc_unseen": 55.5, "runs": [{"seed": 0}]}) == "-"
    assert render_methods.unseen_cell({"acc_test": 60.0}, {"acc_unseen": 50.0, "runs": [{"seed": 0}]}) == "50.00"
    assert render_methods.unseen_cell(entry, None) == "-"


def test_the_evaluations_column_gives_the_range_over_a_rows_seeds():
    import render_methods
    assert render_methods.evaluations_cell({"runs": [{"evaluations": 121}, {"evaluations": 123}]}) == "121-123"
    assert render_methods.evaluations_cell({"runs": [{"evaluations": 120}, {"evaluations": 120}]}) == "120"
    assert render_methods.evaluations_cell({"evaluations": 51}) == "51"
    assert render_methods.evaluations_cell({"acc_test": 80.0}) == ""


def test_a_later_unseen_check_replaces_an_earlier_ones_method_and_keeps_the_rest(tmp_path, monkeypatch):
    import render_methods
    monkeypatch.setattr(render_methods, "RESULTS", tmp_path)
    old = {"m": {"0.3": {"train": {"acc_unseen": 1.0}, "uniform": {"acc_unseen": 0.5}},
                 "0.5": {"train": {"acc_unseen": 2.0}}}}
    new = {"m": {"0.3": {"train": {"acc_unseen": 3.0}}}, "n": {"0.5": {"train": {"acc_unseen": 4.0}}}}
    for name, models in (("old", old), ("new", new)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"models": models}))
    merged = render_methods.unseen_checks(["old", "new"])
    assert merged == {"m": {"0.3": {"train": {"acc_unseen": 3.0}, "uniform": {"acc_unseen": 0.5}},
                            "0.5": {"train": {"acc_unseen": 2.0}}},
                      "n": {"0.5": {"train": {"acc_unseen": 4.0}}}}


def test_headroom_reads_kept_and_best_finalist_per_search_and_seed():
    import headroom
    rows = headroom.finalists(["selection_r20_05_amd"])
    assert sorted(rows) == [("resnet20", 0.5, method, seed) for method in ("random", "train") for seed in (0, 1)]
    train0 = rows["resnet20", 0.5, "train", 0]
    assert train0["finalists"] == 24 and train0["evaluations"] == 164  # the 20 best and the 4 floor allocations
    assert train0["best"] >= max(train0["kept"], train0["unseen"])
