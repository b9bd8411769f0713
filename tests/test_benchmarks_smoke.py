"""Every benchmark still runs: `python -m benchmarks.<name> --smoke` (seconds each, slow-marked: they start
processes, build indexes and train for a few iterations). A benchmark added to benchmarks/ is picked up
by name; one without a --smoke mode fails here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py")
                    if p.stem.startswith("bench_") or p.stem == "crash_drill")


def test_every_benchmark_has_a_smoke_mode():
    """Cheap and always run: the flag is there (the slow test below runs it)."""
    assert len(BENCHMARKS) >= 12, BENCHMARKS
    missing = [n for n in BENCHMARKS if "smoke" not in (REPO / "benchmarks" / f"{n}.py").read_text()]
    assert not missing, f"benchmarks without a --smoke mode: {missing}"


@pytest.mark.slow
@pytest.mark.timeout(900)  # seconds each on a quiet machine; minutes when other jobs hold the cores
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_smoke(name, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--smoke"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=850)
    print(r.stdout[-3000:])
    assert r.returncode == 0, f"python -m benchmarks.{name} --smoke exited {r.returncode}:\n{r.stderr[-3000:]}"
    assert r.stdout.strip(), "a benchmark prints its figures"
