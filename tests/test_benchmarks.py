"""The benchmark scripts run end to end (smoke presets) and write well-formed CSV rows and a plot."""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.cpu_only
def test_bench_distill_loss_smoke(tmp_path):
    env = dict(os.environ, FASTDISTILL_BENCH_RESULTS=str(tmp_path))
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "bench_distill_loss.py"),
            "--preset",
            "smoke",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "median ms" in out.stdout
    rows = list(csv.DictReader(open(tmp_path / "distill_loss.csv")))
    providers = {r["provider"] for r in rows}
    assert {"torch", "fastdistill-torch"} <= providers, providers
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["min_ms"]) <= float(r["median_ms"]) <= float(r["max_ms"])
        assert float(r["peak_mib"]) > 0  # the 64x1000 fp32 gradient alone is 0.24 MiB
        assert r["device"].startswith("cpu") and r["shape"] == "64x1000" and r["git_sha"]
    assert (tmp_path / "distill_loss_smoke.png").stat().st_size > 1000
