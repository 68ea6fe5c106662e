import json

import pytest
from conftest import CIFAR, R20, R56, needs_assets

from agent.cli import main
from pruning_core import UserError

R56_ARGS = ["--model", "resnet56", "--weights", str(R56), "--data", f"cifar10:{CIFAR}"]


def run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@needs_assets
@pytest.mark.slow
def test_prune_cli_report_meets_budget(tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, ["prune", *R56_ARGS, "--flops", "0.5", "--method", "global", "--json",
                                  "--reward-images", "200", "--calib-batches", "2", "--out", str(out_dir),
                                  "--latency", "torch-cl", "--latency-batch", "16"])
    assert code == 0, err
    report = json.loads(out)
    for key in ("model", "flops_dense", "flops", "flops_ratio", "params_ratio", "acc_dense", "acc", "acc_split",
                "acc_reward", "ratios", "method", "seed", "time_s"):
        assert key in report
    assert 0.48 <= report["flops_ratio"] <= 0.5
    assert report["acc_split"] == "test" and report["method"] == "global"
    assert report["reconstruct"] is True and report["acc"] > report["acc_before_reconstruct"]  # refitted by default
    (reason,) = report["excluded"].values()  # the residual streams, coupled by the zero-padding shortcut
    assert "ConstantPadNd" in reason
    assert report["acc"] > 30.0  # adaptive BN keeps a global-ranked 50% ResNet-56 far above chance
    assert json.loads((out_dir / "report.json").read_text())["flops"] == report["flops"]
    assert (out_dir / "model.pt2").is_file()
    # timed in pairs against dense; whether this unrounded allocation is faster is a benchmark's question
    lat = report["latency"]
    assert lat["backend"] == "torch-cl" and lat["batch_size"] == 16
    assert lat["dense_ms"] > 0 and lat["pruned_ms"] > 0, lat
    assert lat["flops_speedup"] == pytest.approx(1 / report["flops_ratio"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def bad_cases(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    ratios_one = tmp_path / "one.json"  # above 1 (1 drops a residual branch, which is allowed)
    ratios_one.write_text(json.dumps({"layer1.0.conv1": 1.5}))
    ratios_neg = tmp_path / "neg.json"
    ratios_neg.write_text(json.dumps({"layer1.0.conv1": -0.2}))
    ratios_unknown = tmp_path / "unknown.json"
    ratios_unknown.write_text(json.dumps({"layer9.conv": 0.2}))
    data = ["--data", f"cifar10:{CIFAR}"]
    r20 = ["--model", "resnet20", "--weights", str(R20), *data]
    return {
        "missing weights": (["--model", "resnet20", "--weights", str(tmp_path / "nope.th"), *data],
                            "weights file not found"),
        "other architecture": (["--model", "resnet56", "--weights", str(R20), *data], "do not fit"),
        "ratio above 1": ([*r20, "--ratios", str(ratios_one)], "must be in [0, 1)"),
        "negative ratio": ([*r20, "--ratios", str(ratios_neg)], "must be in [0, 1)"),
        "unknown group": ([*r20, "--ratios", str(ratios_unknown)], "unknown group 'layer9.conv'"),
        "no batches": (["--model", "resnet20", "--weights", str(R20), "--data", f"cifar10:{empty}"],
                       "no CIFAR-10 batches"),
        "unknown model": (["--model", "resnet7", *data], "unknown model"),
        "unreachable budget": ([*r20, "--flops", "0.05"], "unreachable"),
        "latency budget on a ratios file": ([*r20, "--ratios", str(ratios_one), "--max-latency", "0.6"],
                                            "a --ratios file is used as it is"),
        "latency budget out of range": ([*r20, "--max-latency", "0"], "must be a fraction of dense latency"),
        "reconstruction without adaptive BN": ([*r20, "--reconstruct", "--no-adapt-bn"], "drop --no-adapt-bn"),
    }


@needs_assets
@pytest.mark.parametrize("case", ["missing weights", "other architecture", "ratio above 1", "negative ratio",
                                  "unknown group", "no batches", "unknown model", "unreachable budget",
                                  "latency budget on a ratios file", "latency budget out of range",
                                  "reconstruction without adaptive BN"])
def test_bad_input_clear_error(case, tmp_path, capsys):
    argv, message = bad_cases(tmp_path)[case]
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, ["prune", *argv, "--reward-images", "64", "--calib-batches", "1",
                                  "--out", str(out_dir)])
    assert code == 2
    assert message in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out_dir.exists()


@pytest.mark.parametrize("flags,message", [(["--latency-batch", "0"], "must be >= 1"),
                                           (["--latency", "tensorrt"], "invalid choice"),
                                           (["--round-to", "0"], "whole number >= 1 or 'auto'"),
                                           (["--round-to", "avx"], "whole number >= 1 or 'auto'")])
def test_bad_latency_flags_stop_before_any_work(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--model", "digits_cnn", "--data", "digits", "--out", str(tmp_path / "out"), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_prune_with_a_latency_budget(tmp_path, capsys):
    """uniform under a latency budget as well as the FLOPs one: both hold, and the report gives the prediction."""
    code, out, err = run(capsys, ["prune", "--model", "digits_cnn", "--data", "digits", "--flops", "0.6",
                                  "--round-to", "8", "--max-latency", "0.95", "--latency", "torch",
                                  "--reward-images", "64", "--calib-batches", "1", "--json"])
    assert code == 0, err
    report = json.loads(out)
    budget = report["latency_budget"]
    # 0.95: reachable whatever the timings (the table's probe must run >= 1.1x faster to give it an offset)
    assert budget["backend"] == "torch" and budget["max_latency"] == 0.95 and budget["predicted_ratio"] <= 0.95
    assert report["flops_ratio"] <= 0.6 and report["latency"]["backend"] == "torch"


def test_prune_refits_unless_fine_tuned(tmp_path, capsys):
    """The kept model is refitted to the dense model by default, and the report gives the same allocation's
    accuracy without it; --no-reconstruct, fine-tuning and --no-adapt-bn each leave it unrefitted."""
    import torch

    from pruning_core import build_model
    weights = tmp_path / "digits_cnn.pt"  # one model for every run (without weights each would draw its own)
    torch.save(build_model("digits_cnn").state_dict(), weights)
    base = ["prune", "--model", "digits_cnn", "--weights", str(weights), "--data", "digits", "--flops", "0.5",
            "--reward-images", "64", "--calib-batches", "1", "--json"]
    reports = {}
    for name, flags in {"default": [], "off": ["--no-reconstruct"], "fine-tuned": ["--finetune-epochs", "1"],
                        "no adaptive BN": ["--no-adapt-bn"]}.items():
        code, out, err = run(capsys, [*base, *flags])
        assert code == 0, err
        reports[name] = json.loads(out)
    assert reports["default"]["reconstruct"] is True and reports["default"]["timings"]["reconstruct_s"] > 0
    assert reports["default"]["acc_before_reconstruct"] == reports["off"]["acc"]
    for name in ("off", "fine-tuned", "no adaptive BN"):
        assert reports[name]["reconstruct"] is False and "acc_before_reconstruct" not in reports[name], name
        assert reports[name]["timings"]["reconstruct_s"] == 0, name


def test_prune_methods_in_the_agents_action_space(tmp_path, capsys):
    """--method centre, sensitivity and random search the agent's action space with its reward split: each meets
    the budget, sensitivity reports its table and evaluation count, and random stops at --evaluations."""
    import torch

    from pruning_core import build_model
    weights = tmp_path / "digits_cnn.pt"
    torch.save(build_model("digits_cnn").state_dict(), weights)
    base = ["prune", "--model", "digits_cnn", "--weights", str(weights), "--data", "digits", "--flops", "0.5",
            "--reward-images", "64", "--calib-batches", "1", "--json"]
    reports = {}
    for method in ("centre", "sensitivity", "random"):
        code, out, err = run(capsys, [*base, "--method", method, "--sensitivity-points", "3", "--evaluations", "5"])
        assert code == 0, err
        reports[method] = json.loads(out)
        assert reports[method]["method"] == method and reports[method]["flops_ratio"] <= 0.5
    sens = reports["sensitivity"]["search"]
    # the table, then its allocation (unless that is one of the table's single-unit allocations)
    assert sens["evaluations"] - sum(len(t) for t in sens["table"]) in (0, 1)
    assert all(len(t) <= 3 for t in sens["table"])
    assert reports["random"]["search"]["evaluations"] == 5
    assert reports["random"]["acc_reward"] == pytest.approx(reports["random"]["search"]["rescored"][0]["acc_reward"])


@pytest.mark.parametrize("command", ["prune", "train", "apply"])
def test_round_to_auto_is_this_cpus_channel_block(command):
    """``--round-to auto`` resolves to :func:`cpu_channel_block` as the flags are parsed, so every report and saved
    config records the number."""
    import argparse

    from agent.cli import prune_command_parser
    from agent.commands import apply_command_parser, train_command_parser
    from pruning_core.latency import cpu_channel_block
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    for add in (prune_command_parser, train_command_parser, apply_command_parser):
        add(sub)
    required = {"prune": ["--model", "m", "--data", "digits"], "train": [],
                "apply": ["p", "--model", "m", "--data", "d", "--out", "o"]}
    args = parser.parse_args([command, *required[command], "--round-to", "auto"])
    assert args.round_to == cpu_channel_block() in (8, 16)
    assert parser.parse_args([command, *required[command], "--round-to", "4"]).round_to == 4


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--flops" in text and "--adapt-bn" in text and "--finetune-epochs" in text


@pytest.mark.parametrize("command,flags", [("train", ["--flops", "--max-latency", "--round-to", "--drop-blocks",
                                                      "--resume", "--help-all"]),
                                           ("export", ["--out", "--overwrite"]),
                                           ("apply", ["--search-episodes", "--latency", "--max-latency", "--mean"]),
                                           ("demo", ["--out"])])
def test_every_subcommand_help_renders(command, flags, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(f in text for f in flags), text


def test_train_help_is_short_and_help_all_shows_every_flag(capsys):
    from agent.commands import EXPERT_FLAGS
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    short = capsys.readouterr().out
    assert len(short.splitlines()) <= 80 and "--init-std" not in short
    with pytest.raises(SystemExit):
        main(["train", "--help-all"])
    full = capsys.readouterr().out
    assert all("--" + name.replace("_", "-") in full for name, _, _ in EXPERT_FLAGS)
    assert "(default: 0.3)" in full.split("--init-std")[1].split("\n  --")[0]  # TrainConfig's own default


def test_summary_names_the_groups_left_unpruned(capsys):
    from agent.outputs import print_report
    report = {"model": "m", "method": "uniform", "flops_ratio": 0.5, "params_ratio": 0.5, "acc": 80.0,
              "acc_dense": 90.0, "excluded": {f"g{i}": f"reason {i}" for i in range(4)}}
    print_report(report, as_json=False)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "left unpruned: g0 (reason 0); g1 (reason 1); 2 more in report.json"
    print_report({**report, "excluded": {}}, as_json=False)
    assert "unpruned" not in capsys.readouterr().out


def test_summary_says_whether_the_search_beat_uniform_by_enough(capsys):
    from agent.outputs import print_report
    report = {"model": "m", "method": "rl", "flops_ratio": 0.5, "params_ratio": 0.5, "acc": 80.0, "acc_dense": 90.0,
              "search": {"vs_uniform": {"lead": 0.45, "se": 0.5, "z": 2.0, "kept": "uniform", "best": "sensitivity"}}}
    print_report(report, as_json=False)
    assert capsys.readouterr().out.splitlines()[-1] == ("best candidate (sensitivity) leads uniform by 0.45 ± 0.50 "
                                                        "points on the reward and select images: kept uniform "
                                                        "(within 2 standard errors)")
    print_report({**report, "search": {"vs_uniform": None}}, as_json=False)
    assert "leads uniform" not in capsys.readouterr().out


def test_demo_never_deletes_what_it_did_not_write(tmp_path, capsys):
    """demo --out refuses a folder holding files it did not write (one line, exit 2, nothing touched), and
    replaces only an earlier demo's own files."""
    from agent.demo import MARKER, _clear_earlier_demo
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, _, err = run(capsys, ["demo", "--out", str(mine)])
    assert code == 2 and "holds files no demo wrote (thesis.tex)" in err and len(err.strip().splitlines()) == 1
    assert (mine / "thesis.tex").read_text() == "years of work"
    earlier = tmp_path / "earlier"
    (earlier / "train").mkdir(parents=True)
    (earlier / MARKER).write_text("")
    (earlier / "summary.json").write_text("[]")
    _clear_earlier_demo(earlier)
    assert earlier.is_dir() and not any(earlier.iterdir())
    (earlier / MARKER).write_text("")
    (earlier / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        _clear_earlier_demo(earlier)
    assert (earlier / "notes.txt").is_file()


@pytest.mark.parametrize("command", ["prune", "train", "apply", "export"])
@pytest.mark.parametrize("where,message", [("under a file", "lies under"), ("a file", "exists and is not a folder"),
                                           ("unwritable", "not writable")])
def test_out_is_checked_before_any_work(command, where, message, tmp_path, capsys):
    """A bad --out fails in one line, exit 2, before a model is loaded (a --data that does not exist would
    fail later), and leaves nothing behind."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    out = {"under a file": afile / "sub", "a file": afile, "unwritable": "/proc/prunepilot-test/x"}[where]
    if command == "export" and where == "a file":
        pytest.skip("export --out may name a .zip file")
    argv = {"prune": ["prune", "--model", "resnet20", "--data", "cifar10:/nonexistent"],
            "train": ["train", "--model", "resnet20", "--data", "cifar10:/nonexistent"],
            "apply": ["apply", str(tmp_path / "policy"), "--model", "resnet20", "--data", "cifar10:/nonexistent"],
            "export": ["export", str(tmp_path / "run")]}[command]
    code, _, err = run(capsys, [*argv, "--out", str(out)])
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("command", ["prune", "apply"])
@pytest.mark.parametrize("flops", ["0", "-1", "1.5"])
def test_bad_flops_fail_before_loading(command, flops, tmp_path, capsys):
    argv = {"prune": ["prune"], "apply": ["apply", str(tmp_path / "policy")]}[command]
    code, _, err = run(capsys, [*argv, "--model", "resnet20", "--data", "cifar10:/nonexistent", "--flops", flops,
                                "--out", str(tmp_path / "out")])
    assert code == 2 and "must be in (0, 1]" in err and not (tmp_path / "out").exists()


def test_odd_round_to_warns_and_omitted_weights_are_reported(capsys, caplog):
    with caplog.at_level("WARNING"):
        code, out, err = run(capsys, ["prune", "--model", "digits_cnn", "--data", "digits", "--flops", "0.5",
                                      "--round-to", "7", "--reward-images", "64", "--calib-batches", "1", "--json"])
    assert code == 0, err
    assert "--round-to 7 is not a power of two" in caplog.text and "random initial weights" in caplog.text
    assert json.loads(out)["random_weights"] is True


@pytest.mark.slow
def test_demo_search_beats_uniform(tmp_path, capsys):
    """The demo's bottleneck CNNs are where uniform ratios lose: the search and its zero-shot transfer keep clearly
    more test accuracy than uniform at the same budget, and the table, summary.json and the policy are written."""
    code, out, _ = run(capsys, ["demo", "--out", str(tmp_path / "demo")])
    assert code == 0 and "speed-up" in out and "rl-transfer (" in out
    summary = json.loads((tmp_path / "demo/summary.json").read_text())
    rows = {(r["model"], r["method"].split(" ")[0]): r for r in summary}
    assert len(rows) == 6 and (tmp_path / "demo/policy").is_dir()
    for model, method in (("digits_bottleneck", "rl"), ("digits_bottleneck_deep", "rl-transfer")):
        found, uniform = rows[model, method], rows[model, "uniform"]
        assert found["flops_ratio"] <= 0.25 + 1e-6 and uniform["flops_ratio"] <= 0.25 + 1e-6
        assert found["acc"] >= uniform["acc"] + 3, (found, uniform)
        assert found["speedup"] > 0 and uniform["speedup"] > 0
