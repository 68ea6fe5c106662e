import json

import numpy as np
import pytest
import torch
from helpers import BudgetOnlyEnv, Grouped, randomise, tiny_session

from agent.cli import main
from pruning_core import (
    LatencyBudget,
    LatencyTable,
    UserError,
    build_model,
    global_ratios,
    kept_counts,
    layer_macs,
    trace_model,
    uniform_ratios,
)
from pruning_core.latency import cpu_channel_block
from pruning_core.latency_table import _grid


def macs_table(trace, block: int = 8) -> LatencyTable:
    """A deterministic table whose entries are the layers' MACs at the grid widths (1 ms per MMAC)."""
    layers, shapes = {}, {}
    for name, (key, free_in, free_out) in LatencyTable._shape_keys(trace).items():
        info = trace.layers[name]
        shapes[name] = key
        ins = _grid(info.in_channels, block) if free_in else [info.in_channels]
        outs = _grid(info.out_channels, block) if free_out else [info.out_channels]
        groups = (lambda i, o: o) if info.depthwise else (lambda i, o: 1)
        layers[key] = {"in": ins, "out": outs,
                       "ms": [[layer_macs(info.kind, o if info.depthwise else i, o, groups(i, o), info.kernel,
                                          info.out_hw) / 1e6 for o in outs] for i in ins]}
    dense = sum(layers[k]["ms"][-1][-1] for k in shapes.values())
    return LatencyTable("torch", 1, block, dense, layers, shapes)


def test_offset_fits_the_probe(monkeypatch):
    """The table is fitted to two whole-model timings: dense and the half-width probe. A probe that saves less
    than its layers' entries do gets a positive offset (time that does not shrink with the widths), and then the
    table predicts the probe exactly; one that saves more, or that barely beats dense, leaves it proportional."""
    import pruning_core.latency_table as latency_table

    model = build_model("resnet20").eval()
    trace = trace_model(model, (3, 32, 32))
    entries = macs_table(trace)
    kept = kept_counts(trace, {g.name: 0.5 for g in trace.groups}, 8)
    share = entries.ratio(trace, kept)  # the probe's share of the summed entries (the table is proportional)
    for speedup, offset in ((1.5, True), (1.2 / share, False), (1.05, False)):
        monkeypatch.setattr(latency_table, "compare_latency",
                            lambda *a, s=speedup, **k: {"dense_ms": 100.0, "speedup": s})
        table = LatencyTable.calibrated(model, trace, "torch", 1, 8, entries.layers, entries.shapes)
        assert table.probe == {"kept": kept, "speedup": speedup}
        assert table.ratio(trace, trace.dense_kept()) == pytest.approx(1.0)
        if offset:
            assert 0 < table.offset_ms < 100 and table.ratio(trace, kept) == pytest.approx(1 / 1.5)
            assert table.ratio(trace, {g.name: 8 for g in trace.groups}) > share / 2  # the offset is kept
        else:
            assert table.offset_ms == 0.0 and table.ratio(trace, kept) == pytest.approx(share)


def test_compare_latency_reports_the_median_sweep(monkeypatch):
    """Both timings come from the sweep whose ratio is the speed-up, so the three agree where the machine's speed
    drifts between sweeps (the medians of each model's timings once printed "0.04 ms dense -> 0.06 ms pruned, 1.21x
    faster")."""
    import pruning_core.latency as latency

    seconds = iter([4, 2, 1, 1, 8, 2, 2, 3, 6, 4])  # (dense, pruned) per sweep: ratios 2, 1, 4, 0.67, 1.5
    monkeypatch.setattr(latency, "latency_runner", lambda *a, **k: None)
    monkeypatch.setattr(latency, "time_runner", lambda *a, **k: next(seconds) / 1000)
    timed = latency.compare_latency(None, None, (3, 8, 8), repeats=5)
    assert timed["speedup"] == pytest.approx(1.5)  # the medians taken apart, 4 and 2 ms, give 2x
    assert (timed["dense_ms"], timed["pruned_ms"]) == (pytest.approx(6), pytest.approx(4))


def test_grid_is_block_multiples_and_coarser_for_wide_layers():
    assert _grid(16, 8) == [8, 16]
    assert _grid(60, 8) == [8, 16, 24, 32, 40, 48, 56, 60]
    wide = _grid(512, 8)
    assert wide[-1] == 512 and len(wide) <= 17 and all(w % 8 == 0 for w in wide)


def test_measured_table_predicts_dense_and_round_trips(tmp_path):
    model = randomise(build_model("resnet20")).eval()
    trace = trace_model(model, (3, 32, 32))
    ticks = []
    table = LatencyTable.measure(model, trace, "torch", 1, min_run_time=0.005,
                                 progress=lambda done, total: ticks.append((done, total)))
    convs = [n for n, i in trace.layers.items() if i.kind != "bn"]
    assert set(table.shapes) == set(convs)
    assert table.block == cpu_channel_block()  # the grid and the probe follow this CPU's conv kernels
    assert len(table.layers) < len(convs)  # the blocks of a stage share their shapes: each timed once
    assert ticks[-1][0] == ticks[-1][1] == sum(len(e["in"]) * len(e["out"]) for e in table.layers.values())
    for e in table.layers.values():  # monotone, so that a budget on the prediction can be bisected
        ms = np.array(e["ms"])
        assert (np.diff(ms, axis=0) >= 0).all() and (np.diff(ms, axis=1) >= 0).all()
    dense = trace.dense_kept()
    assert table.predict_ms(trace, dense) == pytest.approx(table.dense_ms)
    # fitted to the half-width probe timed whole too (the fit itself: test_offset_fits_the_probe)
    assert 0.0 <= table.offset_ms < table.dense_ms
    half = kept_counts(trace, uniform_ratios(trace, 0.5, round_to=8), 8)
    assert 0 < table.ratio(trace, half) <= 1.0
    path = tmp_path / "table.json"
    table.save(path)
    again = LatencyTable.load(path, trace)
    assert again.ratio(trace, half) == pytest.approx(table.ratio(trace, half))
    assert again.offset_ms == table.offset_ms and again.probe == table.probe
    assert not list(tmp_path.glob("*.tmp"))
    other = trace_model(build_model("resnet56"), (3, 32, 32))
    with pytest.raises(UserError, match="another model"):
        LatencyTable.load(path, other)
    path.write_text("{not json")
    with pytest.raises(UserError, match="cannot read latency table"):
        LatencyTable.load(path)
    with pytest.raises(UserError, match="unknown latency backend"):
        LatencyTable.measure(model, trace, "tensorrt")
    coarse = LatencyTable.measure(model, trace, "torch", 1, min_run_time=0.001, max_timings=20)
    timings = sum(len(e["in"]) * len(e["out"]) for e in coarse.layers.values())
    assert timings < ticks[-1][1] and coarse.layers.keys() == table.layers.keys()
    assert all(e["out"][-1] == table.layers[k]["out"][-1] for k, e in coarse.layers.items())  # full width kept


@pytest.mark.slow
def test_budget_helpers_and_env_keep_both_budgets():
    """With a latency budget tighter than the FLOPs one, uniform, global and hundreds of random episodes of the
    env's clamp all keep both, in every granularity."""

    session = tiny_session("resnet56")
    trace = session.trace
    table = macs_table(trace)
    budget = LatencyBudget(table, 0.45)
    dense = trace.flops()
    for ratios in (uniform_ratios(trace, 0.5, 0.8, 8, budget), global_ratios(trace, session.scores, 0.5, 0.8, 8,
                                                                               budget)):
        kept = kept_counts(trace, ratios, 8)
        assert trace.flops(kept) <= 0.5 * dense and table.ratio(trace, kept) <= 0.45
    unbound = kept_counts(trace, uniform_ratios(trace, 0.5, 0.8, 8), 8)
    assert table.ratio(trace, unbound) > 0.45  # the latency budget is the one that binds here
    with pytest.raises(UserError, match="latency budget 0.100 is unreachable"):
        uniform_ratios(trace, 0.5, 0.8, 8, LatencyBudget(table, 0.1))
    with pytest.raises(UserError, match="must be a fraction"):
        LatencyBudget(table, 1.5)
    rng = np.random.default_rng(0)
    for granularity in ("group", "substage"):
        env = BudgetOnlyEnv(session=session, flops=0.5, round_to=8, granularity=granularity, latency_budget=budget)
        for episode in range(60):
            env.reset(seed=episode)
            done = False
            while not done:
                a = {0: rng.uniform(-1, 1), 1: -1.0, 2: 1.0}[episode % 3]
                _, _, done, _, info = env.step(np.array([a], np.float32))
            assert info["flops_ratio"] <= 0.5 + 1e-12
            assert table.ratio(trace, env.kept) <= 0.45 + 1e-12
    with pytest.raises(UserError, match="latency budget 0.100 is unreachable for CifarResNet"):
        BudgetOnlyEnv(session=session, flops=0.5, round_to=8, latency_budget=LatencyBudget(table, 0.1))


@pytest.mark.slow
def test_cli_train_with_a_latency_budget(digits_session, tmp_path, capsys):
    torch.save(digits_session.model.state_dict(), tmp_path / "w.pt")
    base = ["train", "--model", "digits_cnn", "--weights", str(tmp_path / "w.pt"), "--data", "digits",
            "--episodes", "4", "--warmup-episodes", "1", "--reward-images", "64", "--calib-batches", "1",
            "--select-images", "64", "--hidden", "16", "--gnn-layers", "1", "--no-progress"]
    assert main([*base, "--max-latency", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "--max-latency 1.5 must be a fraction" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    run = tmp_path / "run"
    # 0.95: reachable whatever the timings, as the half-width probe must run >= 1.1x faster to shape the table
    assert main([*base, "--max-latency", "0.95", "--latency-backend", "torch", "--round-to", "8",
                 "--out", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    budget = report["search"]["latency_budget"]
    assert budget["backend"] == "torch" and budget["max_latency"] == 0.95 and budget["predicted_ratio"] <= 0.95
    table = LatencyTable.load(run / "latency_table.json")
    assert table.backend == "torch" and json.loads((run / "config.json").read_text())["max_latency"] == 0.95
    history = json.loads((run / "history.json").read_text())
    assert all(h["flops_ratio"] <= 0.5 for h in history)
    # the exported policy carries its budget: apply measures a table for the new model and keeps within it
    assert main(["export", str(run), "--out", str(tmp_path / "policy")]) == 0
    capsys.readouterr()
    assert main(["apply", str(tmp_path / "policy"), "--model", "digits_cnn_wide", "--data", "digits",
                 "--reward-images", "64", "--calib-batches", "1", "--select-images", "64",
                 "--out", str(tmp_path / "applied"), "--json"]) == 0
    applied = json.loads(capsys.readouterr().out)
    budget = applied["transfer"]["latency_budget"]
    assert budget["max_latency"] == 0.95 and budget["predicted_ratio"] <= 0.95 and applied["flops_ratio"] <= 0.5
    assert applied["round_to"] == 8
    assert main(["apply", str(tmp_path / "policy"), "--model", "digits_cnn_wide", "--data", "digits",
                 "--max-latency", "0", "--out", str(tmp_path / "bad2")]) == 2
    assert "must be a fraction" in capsys.readouterr().err and not (tmp_path / "bad2").exists()


@pytest.mark.parametrize("capability, block", [("AVX512", 16), ("AVX512_BF16", 16), ("AVX2", 8), ("DEFAULT", 8)])
def test_cpu_channel_block_follows_the_simd_width(capability, block, monkeypatch):
    """The conv kernels' channel block is 16 on AVX-512 machines, where a width of 8 is half a block, else 8."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_channel_block() == block


def test_grouped_convs_in_the_table_and_the_env():
    """A grouped conv is timed with its conv groups at widths that are multiples of them, and the env's episodes
    keep every group's blocks even while both budgets hold."""

    session = tiny_session(randomise(Grouped()))
    trace = session.trace
    table = LatencyTable.measure(session.model, trace, "torch", 1, block=8, min_run_time=0.002)
    grouped = {k: e for k, e in table.layers.items() if " g" in k}
    assert set(grouped) == {"conv k3 s1 g4 24*x48* @32x32", "conv k3 s1 g2 32*x24 @32x32",
                            "conv k3 s1 g24 24x48* @32x32"}, list(table.layers)
    assert grouped["conv k3 s1 g4 24*x48* @32x32"]["out"] == [8, 16, 24, 32, 40, 48]  # lcm(8, 4) = 8
    assert grouped["conv k3 s1 g24 24x48* @32x32"]["out"] == [24, 48]  # multiples of its 24 groups
    # the budget is checked on entries proportional to in x out widths, not on timings this machine's load can
    # reorder, so that it binds the same way on every run
    synthetic = {k: {**e, "ms": [[i * o / 1000 for o in e["out"]] for i in e["in"]]} for k, e in table.layers.items()}
    table = LatencyTable(table.backend, table.batch_size, table.block, 1.0, synthetic, table.shapes)

    def episodes(latency_budget: LatencyBudget | None) -> list[float]:
        """The table's latency ratio of 20 random episodes per action space, each checked for blocks and FLOPs."""
        rng, ratios = np.random.default_rng(0), []
        for granularity, round_to in (("group", None), ("substage", 8)):
            env = BudgetOnlyEnv(session=session, flops=0.5, round_to=round_to, granularity=granularity,
                                latency_budget=latency_budget)
            for episode in range(20):
                env.reset(seed=episode)
                done = False
                while not done:
                    _, _, done, _, info = env.step(np.array([rng.uniform(-1, 1)], np.float32))
                assert all(env.kept[g.name] % g.blocks == 0 for g in trace.groups), env.kept
                assert info["flops_ratio"] <= 0.5 + 1e-12
                ratios.append(table.ratio(trace, env.kept))
        return ratios

    assert max(episodes(LatencyBudget(table, 0.45))) <= 0.45 + 1e-12 < max(episodes(None))
