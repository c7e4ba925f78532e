"""The benchmark suite's report generation on a tiny synthetic result, and the driver's quick mode."""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.commands import run_command

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
MIB = 2**20


@pytest.fixture
def report():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("report")
    finally:
        sys.path.remove(str(BENCH))


def _row(group, system, median, held, *, host=0, n=None, restore=None, budget=None, link=False, tokens=4096,
         ratio=None):
    label = {"hf_ep_grouped_mm": "HF built-in EP (AllToAllEP, grouped_mm)", "ours_auto": "ours default"}.get(
        system, system)
    return {"key": f"{group}-{system}-{budget}", "group": group, "system": system, "label": label, "ep": 2,
            "tokens_per_rank": tokens, "top_k": 2, "link": link, "budget_bytes": budget, "chosen_n": n,
            "chosen_restore": restore, "tuning_calls": 5 if system.startswith("ours_auto") else 0,
            "timed_steps_profiling": 0, "median_s": median, "min_s": median * 0.9, "max_s": median * 1.1,
            "q1_s": median, "q3_s": median, "repeats": 3, "tokens_per_s": 2 * tokens / median,
            "time_vs_hf_ep": None if ratio is None else {"median_s": ratio, "min_s": ratio - 0.1,
                                                          "max_s": ratio + 0.2, "runs": 3},
            "held_vs_hf_ep": None if link else held / (80 * MIB if tokens == 4096 else 20 * MIB),
            "held_bytes": held, "host_held_bytes": host, "peak_step_bytes": 30 * MIB,
            "machine": {"torch": "x", "cpus": 2, "cuda": None, "loadavg": [1.0, 1.0, 1.0]}}


def _e2e_pair(ours, hf, hf_first=False):
    pair = {"ours": {"label": "ours", "steps": 40, "tokens_per_s": ours, "peak_rss_bytes": 600 * MIB, "wall_s": 30.0},
            "hf_ep_ddp": {"label": "hf", "steps": 40, "tokens_per_s": hf, "peak_rss_bytes": 590 * MIB,
                          "wall_s": 29.0}}
    return {"steps": 40, "order": ["hf_ep_ddp", "ours"] if hf_first else ["ours", "hf_ep_ddp"], **pair,
            "ratio": ours / hf}


def _payload():
    rows = [
        _row("main", "hf_ep_grouped_mm", 0.30, 80 * MIB, ratio=1.0),
        _row("main", "ours_n1", 0.28, 80 * MIB, n=1, restore="none", ratio=0.95),
        _row("main", "ours_n4", 0.29, 50 * MIB, n=4, restore="none", ratio=0.97),
        _row("main", "ours_n4_s4", 0.31, 12 * MIB, n=4, restore="s4", ratio=1.04),
        _row("main", "ours_auto", 0.27, 80 * MIB, n=1, restore="none", ratio=0.90),
        _row("main", "ours_auto_budget50", 0.33, 30 * MIB, host=8 * MIB, n=8, restore="s3", budget=40 * MIB,
             ratio=1.10),
        _row("link", "ours_n2", 0.40, 60 * MIB, n=2, restore="none", link=True),
        _row("tokens", "hf_ep_grouped_mm", 0.08, 20 * MIB, tokens=1024, ratio=1.0),
        _row("tokens", "ours_n1", 0.07, 20 * MIB, n=1, restore="none", tokens=1024, ratio=0.8),
        {"key": "ep4-ours_n1", "group": "ep4", "system": "ours_n1", "ep": 4, "tokens_per_rank": 2048, "top_k": 2,
         "link": False, "error": "Traceback ...\nRuntimeError: boom"},
    ]
    return {"created_utc": "2026-01-01T00:00:00+00:00", "quick": True, "rounds": 3, "warmup": 1,
            "suite_wall_s": 60.0, "section_wall_s": {"model_step": 30.0, "layer": 24.0, "report": 6.0}, "rows": rows,
            "e2e": {"steps": 40, "rounds": [_e2e_pair(9000.0, 10000.0), _e2e_pair(9900.0, 9000.0, hf_first=True)],
                    "ratio": {"median": 1.0, "min": 0.9, "max": 1.1}}}


def test_report_writes_markdown_csv_and_plots(report, tmp_path):
    payload = _payload()
    md = report.generate(payload, tmp_path / "RESULTS.md", tmp_path / "plots")
    text = md.read_text()
    assert "suite wall time 1.0 min (model step 0.5 min, layer 0.4 min, report 0.1 min)" in text
    assert "our fastest row (ours default) takes 0.90× [0.80, 1.10] HF EP's step time: **not behind**" in text
    assert "**within the budget**" in text and "1.10× [1.00, 1.30] HF EP's** (≤ 1.25×)" in text
    assert "| ours_n4 | 2 | 4096 | n=4, none | 290 [261, 319] | 28,248 | 50.00 | 0.00 | 30.0 | 0.97× [0.87, 1.17] |" \
        in text
    assert "0.62×" in text  # held / HF EP of n=4: 50 / 80
    assert "failed: `RuntimeError: boom`" in text
    assert "**1.00×** median over 2 rounds [0.90, 1.10]" in text and "1.10× (round 1: hf_ep_ddp then ours)" in text
    for name in ("time_vs_n", "memory_vs_strategy", "speedup_vs_tokens"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{name}.png)" in text
    report.write_csv(payload["rows"], tmp_path / "suite.csv")
    with (tmp_path / "suite.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(payload["rows"])
    assert table[5]["system"] == "ours_auto_budget50" and float(table[5]["time_vs_hf_ep_max"]) == pytest.approx(1.3)


def test_report_regenerates_from_saved_json(report, tmp_path):
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(_payload()))
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), str(path), "--md", str(tmp_path / "R.md"),
                           "--plots", str(tmp_path / "p")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "R.md").exists() and (tmp_path / "suite.csv").exists()


def test_layer_bench_refuses_bad_system_lists():
    sys.path.insert(0, str(BENCH))
    try:
        bench_layer = importlib.import_module("bench_layer")
    finally:
        sys.path.remove(str(BENCH))
    bench_layer.check_systems(["hf_ep_grouped_mm", "ours_n4_s4", "ours_auto_budget50"], link=False)
    with pytest.raises(ValueError, match="unknown system.*ours_n0"):
        bench_layer.check_systems(["hf_ep_grouped_mm", "ours_n0"], link=False)
    with pytest.raises(ValueError, match="twice"):
        bench_layer.check_systems(["ours_n1", "ours_n1"], link=False)
    with pytest.raises(ValueError, match="no simulated-link seam"):
        bench_layer.check_systems(["hf_ep_eager", "ours_n1"], link=True)
    with pytest.raises(ValueError, match="add hf_ep_grouped_mm"):
        bench_layer.check_systems(["ours_auto_budget50"], link=False)


def test_e2e_rounds_alternate_the_order(monkeypatch, tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        e2e = importlib.import_module("bench_e2e_finetune")
    finally:
        sys.path.remove(str(BENCH))
    calls = []
    speeds = iter([100.0, 80.0, 100.0, 90.0, 95.0, 100.0])

    def side(name):
        def run(out_dir, steps):
            calls.append(name)
            return {"label": name, "steps": steps, "tokens_per_s": next(speeds)}
        return run

    monkeypatch.setattr(e2e, "run_ours", side("ours"))
    monkeypatch.setattr(e2e, "run_hf_ddp", side("hf"))
    result = e2e.run_rounds(tmp_path, steps=10, rounds=3)
    assert calls == ["ours", "hf", "hf", "ours", "ours", "hf"]
    assert [round(p["ratio"], 3) for p in result["rounds"]] == [1.25, 0.9, 0.95]
    assert result["ratio"] == {"median": 0.95, "min": 0.9, "max": 1.25}
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        e2e.run_rounds(tmp_path, rounds=0)


@pytest.mark.slow  # one spawned gloo launch of three systems interleaved, ~30 s on 2 cores
def test_suite_quick_mode(report, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_command([sys.executable, str(BENCH / "suite.py"), "--quick", "--out-dir", str(tmp_path)],
                       env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    payload = json.loads((tmp_path / "suite_quick.json").read_text())
    rows = payload["rows"]
    assert rows and all("error" not in r for r in rows)
    assert len({r["launch_key"] for r in rows}) == 1  # every system in one launch
    by_system = {r["system"]: r for r in rows}
    hf, budget = by_system["hf_ep_grouped_mm"], by_system["ours_auto_budget50"]
    assert hf["time_vs_hf_ep"]["median_s"] == 1.0 and hf["time_vs_hf_ep"]["max_s"] == 1.0
    for row in rows:
        r = row["time_vs_hf_ep"]
        assert r["runs"] == payload["rounds"] == len(row["times_s"]) and r["min_s"] <= r["median_s"] <= r["max_s"]
        # the per-round ratio, recomputed from the raw times of the same rounds
        ratios = sorted(t / h for t, h in zip(row["times_s"], hf["times_s"]))
        assert r["min_s"] == pytest.approx(ratios[0]) and r["max_s"] == pytest.approx(ratios[-1])
        assert row["held_bytes"] > 0 and row["peak_step_bytes"] > 0
    # the budget is half of what HF EP's call holds, measured in the same launch; the tuner keeps to it
    assert budget["budget_bytes"] == int(hf["held_bytes"]) // 2
    assert budget["held_bytes"] + budget["host_held_bytes"] <= budget["budget_bytes"]
    assert by_system["ours_n2"]["held_bytes"] < hf["held_bytes"]  # no reuse at n = 2: less than HF's
    assert set(payload["section_wall_s"]) == {"layer", "report"}
    text = (tmp_path / "RESULTS.md").read_text()
    assert "(layer " in text and "time / HF EP per round" in text
    assert (tmp_path / "plots" / "speedup_vs_tokens.png").exists()


def _model_step_result(default_ratio, budget_held):
    def times(median):
        return {"median_s": median, "min_s": median * 0.9, "max_s": median * 1.2, "runs": 5}

    ratios = {"hf_ep": 1.0, "ours_default": default_ratio, "ours_budget50": 1.10, "ours_n1": 0.95}
    memory = {"hf_ep": (100 * MIB, 10 * MIB, 400 * MIB), "ours_default": (90 * MIB, 8 * MIB, 380 * MIB),
              "ours_budget50": (60 * MIB, budget_held, 300 * MIB), "ours_n1": (100 * MIB, 10 * MIB, 420 * MIB)}
    return {
        "shape": {"family": "mixtral"}, "tokens_per_rank": 2048, "repeats": 5, "budgets": {"ours_budget50": 5 * MIB},
        "first_step_loss": dict.fromkeys(ratios, 6.25), "timed_steps_profiling": dict.fromkeys(ratios, 0),
        "times": {s: times(0.5 * r) for s, r in ratios.items()},
        "ratio_vs_hf_ep": {s: times(r) for s, r in ratios.items()},
        "memory": {s: {"saved_bytes": m[0], "experts_bytes_per_layer": m[1], "peak_bytes": m[2]}
                   for s, m in memory.items()},
        "tuner_metrics_rank0": {"ours_default": [{"num_partitions": 4.0, "restore": 0.0}] * 2,
                                "ours_budget50": [{"num_partitions": 8.0, "restore": 4.0}] * 2},
    }


def test_report_whole_model_section(report, tmp_path):
    payload = _payload()
    payload["model_step"] = {"results": {"mixtral": _model_step_result(0.9, 4 * MIB),
                                         "qwen3": _model_step_result(1.2, 6 * MIB)}}
    text = report.generate(payload, tmp_path / "RESULTS.md", tmp_path / "plots").read_text()
    expect = text.index("## What to expect")
    assert expect < text.index("## Checks") and "ours, default ExecutorConfig() 0.90× the step time, -5% peak" in text
    row = "| ours, n=1 (plain path) | – | 475 [428, 570] | 0.95× [0.85, 1.14] | 100.0 | 10.0 | 420.0 | 6.250000 |"
    assert row in text
    assert "| ours, default ExecutorConfig() | n=4, none / n=4, none |" in text
    assert "ours, memory_budget 50% of HF EP (5.0 MiB: within) | n=8, s4 / n=8, s4 |" in text
    assert "(5.0 MiB: **over**)" in text  # the qwen3 result's budget row holds 6 MiB
    checks = [line for line in text.splitlines() if line.startswith("- Mixtral") or line.startswith("- Qwen3")]
    assert len(checks) == 2 and "default ExecutorConfig(): 0.90× HF EP (≤ 1.00×: **met**)" in checks[0]
    assert "1.20× HF EP (≤ 1.00×: **not met**)" in checks[1] and "(≤ 1.15× and within: **not met**)" in checks[1]
    png = tmp_path / "plots" / "model_step_memory_vs_time.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](plots/model_step_memory_vs_time.png)" in text


@pytest.mark.slow  # one spawned gloo launch of three tiny-batch systems, about a minute on 2 cores
def test_model_step_bench_agrees_across_systems(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "model_step.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_model_step.py"), "--shapes", "mixtral", "--tokens", "256",
                           "--repeats", "2", "--max-tune-steps", "2", "--systems", "hf_ep", "ours_n1", "ours_budget50",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())["results"]["mixtral"]
    losses = result["first_step_loss"]
    assert max(losses.values()) - min(losses.values()) < 1e-5  # same weights, same batch, same model
    assert set(result["times"]) == {"hf_ep", "ours_n1", "ours_budget50"}
    assert result["ratio_vs_hf_ep"]["hf_ep"]["median_s"] == 1.0
    memory = result["memory"]
    assert all(m["saved_bytes"] > 0 and m["peak_bytes"] > 0 for m in memory.values())
    # The plain path saves what HF's grouped_mm experts save, within the activations it keeps (SiLU outputs).
    hf, n1 = memory["hf_ep"]["experts_bytes_per_layer"], memory["ours_n1"]["experts_bytes_per_layer"]
    assert 0.5 * hf < n1 < 2 * hf
    assert result["budgets"]["ours_budget50"] == int(0.5 * result["hf_ep_experts_bytes_per_layer"])
