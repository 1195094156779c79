"""The benchmark runs end to end at a small size (its figures are not judged here)."""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "bench"))
import turnaround


# Loads both cores: one at a time on the machine (whole_machine), run by the cluster tests' xdist worker.
# A whole benchmark, if small: minutes on a loaded 2-core machine; the wait for the machine apart.
@pytest.mark.xdist_group("whole_machine")
@pytest.mark.timeout(660, func_only=True)
def test_benchmark_runs_and_prints_its_table(broker, whole_machine):
    as_root = turnaround.can_capture()  # the bench adds its turnaround rows when it can capture packets
    # Through run_script: if it overruns, it gets Ctrl+C and time to stop its workers and the peers'
    # (each in a session of its own), and the failure shows how far it got (each step is on stderr).
    try:
        result = run_script("bench/bench.py", "--quick", "--url", broker.url, env=dict(os.environ), timeout=600)
    except subprocess.TimeoutExpired as error:
        steps = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr
        raise AssertionError(f"the benchmark overran 600 s; its steps so far:\n{steps}") from None
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    # header, separator, 6 publish, 6 drain, 1 isolation cost, 6 concurrency, 2 makespan and 2 memory rows;
    # 3 turnaround rows when root; the peers: a heading, 3 drains x 4 systems and 4 makespans
    assert len(table) == 25 + (3 if as_root else 0) + 17
    for row in ("Producer.send_many()", "Producer.send() from 16 threads"):
        assert re.search(rf"^\| [^|]*{re.escape(row)}[^|]*\| [\d,]+ \| [\d,]+/s", result.stdout, re.M), row
    for system in ("ours (classic)", "ours (quorum)", "Dramatiq: ", "Celery: "):
        for what in ("one at a time", "best settings", "50 ms I/O-bound tasks, 8 at once", "makespan, 3 workers"):
            assert re.search(rf"^\| [^|]*{re.escape(what)}[^|]*{re.escape(system)}", result.stdout, re.M), (
                what,
                system,
            )
    assert re.search(
        r"\| --isolation process: cost per task over threads.* \| [+-]\d+ µs / [+-]\d+ µs \|", result.stdout
    )
    for concurrency in (1, 4, 16):
        assert re.search(
            rf"\| drain, 50 ms I/O-bound tasks: \*\*ours\*\*: worker.py --concurrency {concurrency} \|", result.stdout
        )
    assert "ours: new_task.py --file" in result.stdout
    assert re.search(r"^Machine: .*, RabbitMQ \d+\.\d+\.\d+;", result.stdout, re.M)  # which broker the figures are of
    assert "prefetch 0 (round-robin)" in result.stdout
    if as_root:
        assert re.search(
            r"\| worker's time per task .*: ours: worker.py --prefetch 1 \| [\d,]+ x 1 \| \d+ µs", result.stdout
        )
