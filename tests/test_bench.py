"""The benchmark runs end to end at a small size (its figures are not judged here)."""

import subprocess
import sys

from conftest import ROOT


def test_benchmark_runs_and_prints_its_table(broker):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--url", broker.url],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 14  # header, separator, 4 publish, 4 drain, 2 makespan and 2 memory rows
    assert "ours: new_task.py --file" in result.stdout
    assert "prefetch 0 (round-robin)" in result.stdout
