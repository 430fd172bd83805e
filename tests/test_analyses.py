"""The analysis scripts run end to end in their --smoke mode and write what they promise."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_performance_smoke(tmp_path):
    out = tmp_path / "bench"
    subprocess.run(
        [sys.executable, str(ROOT / "analyses" / "benchmark_performance.py"), "--smoke", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    results = json.loads((out / "results.json").read_text())
    ratio = results["ratios"]["train_step_vs_map"]
    assert ratio > 0 and ratio == results["median_step_seconds"]["bh_peft"] / results["median_step_seconds"]["map"]
    assert len(results["step_seconds"]["bh_peft"]) == len(results["step_seconds"]["map"]) > 0
    assert results["sites"]["bh_peft"] == results["sites"]["map"] > 0
    assert {"torch", "pyro-ppl", "transformers"} <= set(results["versions"])
    assert not list(out.glob("*.tmp"))
