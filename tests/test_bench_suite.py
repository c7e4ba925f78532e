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
