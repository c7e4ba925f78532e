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


def _row(group, system, median, held, *, host=0, n=None, restore=None, budget=None, link=False, tokens=4096):
    label = {"hf_ep_grouped_mm": "HF built-in EP (AllToAllEP, grouped_mm)", "ours_auto": "ours adaptive"}.get(
        system, system)
    return {"key": f"{group}-{system}-{budget}", "group": group, "system": system, "label": label, "ep": 2,
            "tokens_per_rank": tokens, "top_k": 2, "link": link, "budget_bytes": budget, "chosen_n": n,
            "chosen_restore": restore, "median_s": median, "min_s": median * 0.9, "max_s": median * 1.1,
            "q1_s": median, "q3_s": median, "repeats": 3, "tokens_per_s": 2 * tokens / median,
            "held_bytes": held, "host_held_bytes": host, "peak_rss_bytes": 500 * MIB,
            "machine": {"torch": "x", "cpus": 2, "cuda": None}}


def _payload():
    rows = [
        _row("main", "hf_ep_grouped_mm", 0.30, 80 * MIB),
        _row("main", "ours_n1", 0.28, 80 * MIB, n=1, restore="none"),
        _row("main", "ours_n4", 0.29, 50 * MIB, n=4, restore="none"),
        _row("main", "ours_auto", 0.27, 80 * MIB, n=1, restore="none"),
        _row("main", "ours_auto", 0.33, 30 * MIB, host=8 * MIB, n=8, restore="s3", budget=40 * MIB),
        _row("link", "ours_n2", 0.40, 60 * MIB, n=2, restore="none", link=True),
        _row("tokens", "hf_ep_grouped_mm", 0.08, 20 * MIB, tokens=1024),
        _row("tokens", "ours_n1", 0.07, 20 * MIB, n=1, restore="none", tokens=1024),
        {"key": "ep4-ours_n1", "group": "ep4", "system": "ours_n1", "ep": 4, "tokens_per_rank": 2048, "top_k": 2,
         "link": False, "error": "Traceback ...\nRuntimeError: boom"},
    ]
    return {"created_utc": "2026-01-01T00:00:00+00:00", "quick": True, "repeats": 3, "warmup": 1,
            "suite_wall_s": 60.0, "rows": rows,
            "e2e": {"ours": {"label": "ours", "steps": 40, "tokens_per_s": 9000.0, "peak_rss_bytes": 600 * MIB,
                             "wall_s": 30.0},
                    "hf_ep_ddp": {"label": "hf", "error": "exit 1: boom"}}}


def test_report_writes_markdown_csv_and_plots(report, tmp_path):
    payload = _payload()
    md = report.generate(payload, tmp_path / "RESULTS.md", tmp_path / "plots")
    text = md.read_text()
    assert "**not behind**" in text  # ours 0.27 s / 0.28 s against HF's 0.30 s
    assert "**within the budget**" in text and "1.10× HF EP's" in text
    assert "| ours_n4 | 2 | 4096 | n=4, none | 290 [261, 319] |" in text
    assert "0.62×" in text  # held / HF EP of n=4: 50 / 80
    assert "failed: `RuntimeError: boom`" in text
    assert "exit 1: boom" in text
    for name in ("time_vs_n", "memory_vs_strategy", "speedup_vs_tokens"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{name}.png)" in text
    report.write_csv(payload["rows"], tmp_path / "suite.csv")
    with (tmp_path / "suite.csv").open(newline="") as f:
        table = list(csv.reader(f))
    assert table[0][:3] == ["key", "group", "system"] and len(table) == 1 + len(payload["rows"])


def test_report_regenerates_from_saved_json(report, tmp_path):
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(_payload()))
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), str(path), "--md", str(tmp_path / "R.md"),
                           "--plots", str(tmp_path / "p")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "R.md").exists() and (tmp_path / "suite.csv").exists()


@pytest.mark.slow  # four spawned gloo launches, about a minute on 2 cores
def test_suite_quick_mode(report, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_command([sys.executable, str(BENCH / "suite.py"), "--quick", "--out-dir", str(tmp_path)],
                       env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    payload = json.loads((tmp_path / "suite_quick.json").read_text())
    assert payload["rows"] and all("error" not in r for r in payload["rows"])
    assert (tmp_path / "RESULTS.md").exists() and (tmp_path / "plots" / "time_vs_n.png").exists()


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
