"""The locust load test: a ~10 s headless smoke run from nothing (zero failures asserted, not
timings), and the SLO checks of the runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loadtests.run import check_slo

ROOT = Path(__file__).resolve().parents[1]


def test_headless_smoke_run_from_nothing_has_zero_failures(tmp_path):
    out = tmp_path / "loadtest"
    result = subprocess.run(
        [sys.executable, "loadtests/run.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    total = summary["total"]
    assert total["requests"] > 50 and total["failures"] == 0
    assert set(summary["by_name"]) == {
        "recommend (known user)",
        "recommend (cold user)",
        "close session",
    }
    assert (out / "report.html").stat().st_size > 0
    assert (out / "locust_stats.csv").exists() and (out / "locust_stats_history.csv").exists()
    assert "SLO met" in result.stdout and "failure ratio 0.0000" in result.stdout


def _summary(**total):
    base = {"requests": 100, "failures": 0, "failure_ratio": 0.0, "rps": 80.0}
    return {"total": {**base, "p50_ms": 10.0, "p95_ms": 40.0, "p99_ms": 90.0, **total}}


def test_slo_thresholds_are_checked_and_reported():
    assert check_slo(_summary(), {"max_failure_ratio": 0.0, "max_p99_ms": 100, "min_rps": 50}) == []
    misses = check_slo(
        _summary(failures=2, failure_ratio=0.02, p99_ms=150.0, rps=20.0),
        {"max_failure_ratio": 0.0, "max_p99_ms": 100, "min_rps": 50},
    )
    assert misses == [
        "failure_ratio = 0.02, limit max_failure_ratio = 0",
        "p99_ms = 150, limit max_p99_ms = 100",
        "rps = 20, limit min_rps = 50",
    ]
    assert check_slo(_summary(), {"max_p42_ms": 1}) == ["unknown SLO keys ['max_p42_ms']"]
    assert check_slo(_summary(requests=0), {}) == ["no requests were made"]
