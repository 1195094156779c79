"""worker.py --metrics-port: Prometheus metrics and /healthz, scraped as Prometheus and a probe would."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, publish, run_script, start_worker, wait_for_counts, wait_until

from local_broker import free_port


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text (its labels in any order)."""
    for line in text.splitlines():
        found = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if found and dict(re.findall(r'(\w+)="([^"]*)"', found[1] or "")) == labels:
            return float(found[2])
    raise AssertionError(f"no {name} {labels} in:\n{text}")


def test_counters_are_exact_after_a_known_mix_of_tasks(env, queue, start, broker):
    port = free_port()
    worker = start_worker(start, queue, "--metrics-port", str(port), "--max-retries", "1", "--retry-delays", "0")
    publish(env, queue, "ok1.", "an error", "ok2.")
    worker.wait_for(r"Failed 'an error': .*moved to ")
    worker.wait_for(r"Done 'ok2\.'")

    _, text = get(port, "/metrics")
    assert sample(text, "workqueue_tasks_total", queue=queue, outcome="done") == 2
    assert sample(text, "workqueue_tasks_total", queue=queue, outcome="retried") == 1
    assert sample(text, "workqueue_tasks_total", queue=queue, outcome="dead_lettered") == 1
    assert sample(text, "workqueue_tasks_total", queue=queue, outcome="lost") == 0
    assert sample(text, "workqueue_task_seconds_count", queue=queue) == 4  # every run: 2 done, 2 failed
    assert sample(text, "workqueue_task_seconds_bucket", queue=queue, le="+Inf") == 4
    assert sample(text, "workqueue_tasks_in_progress", queue=queue) == 0
    assert sample(text, "workqueue_connected") == 1
    assert sample(text, "workqueue_reconnects_total") == 0

    # Asked for OpenMetrics, as Prometheus asks with exemplars on: the last task of a series, by its id.
    asked = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": OPENMETRICS})
    with urllib.request.urlopen(asked, timeout=5) as response:
        text = response.read().decode()
    short = re.search(r"Failed 'an error': .*; moved to \S+ \[id ([0-9a-f]{8})\]", worker.output)[1]
    dead = re.search(
        r'^workqueue_tasks_total\{[^}]*outcome="dead_lettered"[^}]*\} 1\.0 # \{task_id="([^"]+)"\}', text, re.M
    )
    assert dead and dead[1].startswith(short) and len(dead[1]) == 36, text  # the id new_task.py gave it


def test_the_queue_wait_is_counted_from_the_publish_or_from_the_due_time(env, queue, start, broker):
    """What an operator scales on: how long tasks waited for a worker. A delayed task waited from its due
    time, not from its publish (or every delayed task would look late)."""
    port = free_port()
    worker = start_worker(start, queue, "--metrics-port", str(port))
    publish(env, queue, "now.")
    publish(env, queue, "later.", extra=("--delay", "4"))
    worker.wait_for(r"Done 'later\.'", timeout=30)
    _, text = get(port, "/metrics")
    assert sample(text, "workqueue_task_queue_wait_seconds_count", queue=queue) == 2
    assert sample(text, "workqueue_task_queue_wait_seconds_sum", queue=queue) < 4  # from publish: 4 s at least


@pytest.mark.parametrize("ack", ["manual", "auto"])
def test_a_timed_out_task_is_counted(env, queue, start, broker, ack):
    port = free_port()
    mode = ("--auto-ack",) if ack == "auto" else ("--max-retries", "0")
    worker = start_worker(start, queue, "--metrics-port", str(port), "--time-limit", "0.5", *mode)
    publish(env, queue, "hang")
    worker.wait_for(
        r"Failed 'hang': time limit of 0.5 s exceeded" + (r" \(auto-ack" if ack == "auto" else "; moved to ")
    )
    _, text = get(port, "/metrics")
    assert sample(text, "workqueue_tasks_total", queue=queue, outcome="timed_out") == 1
    outcome = "lost" if ack == "auto" else "dead_lettered"  # an auto-acked task that failed is gone
    assert sample(text, "workqueue_tasks_total", queue=queue, outcome=outcome) == 1


def test_healthz_follows_the_broker_down_and_back(env, queue, start, running_broker):
    port = free_port()
    worker = start_worker(start, queue, "--metrics-port", str(port))
    assert get(port, "/healthz") == (200, f"ok: connected and consuming from '{queue}'\n")

    running_broker.stop()
    wait_until(lambda: get(port, "/healthz")[0] == 503, timeout=30, what="/healthz to answer 503")
    _, reason = get(port, "/healthz")
    assert reason.count("\n") == 1 and ("broker lost" in reason or "connecting" in reason), reason
    assert sample(get(port, "/metrics")[1], "workqueue_connected") == 0
    assert sample(get(port, "/metrics")[1], "workqueue_reconnects_total") == 0  # trying is not reconnecting

    running_broker.start()
    wait_until(lambda: get(port, "/healthz")[0] == 200, timeout=90, what="/healthz to answer 200 again")
    assert sample(get(port, "/metrics")[1], "workqueue_reconnects_total") >= 1
    publish(env, queue, "after")
    worker.wait_for(r"Done 'after'")
    wait_for_counts(running_broker, queue, 0, 0)


def test_healthz_says_shutting_down(env, queue, start, broker):
    port = free_port()
    worker = start_worker(start, queue, "--metrics-port", str(port), "--dot-seconds", "1")
    publish(env, queue, "long...")
    worker.wait_for(r"Received 'long")
    worker.signal()
    wait_until(lambda: get(port, "/healthz") == (503, "shutting down\n"), timeout=10, what="503 shutting down")
    assert worker.wait(timeout=30) == 0


def test_a_port_in_use_is_a_usage_error(env, queue):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_script("worker.py", "--queue", queue, "--metrics-port", str(port), env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"--metrics-port {port}: cannot listen on 127.0.0.1: Address already in use" in result.stderr


def test_without_the_option_nothing_is_imported_or_served():
    code = "import sys, worker; print('prometheus_client' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_an_idle_and_a_slow_client_do_not_block_the_health_check(env, queue, start, broker):
    """A load balancer's half-open connection, a scraper that stalls mid-request: /healthz still answers."""
    port = free_port()
    worker = start_worker(start, queue, "--metrics-port", str(port))
    with socket.create_connection(("127.0.0.1", port)) as idle, socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x")  # and nothing more
        for _ in range(3):
            assert get(port, "/healthz") == (200, f"ok: connected and consuming from '{queue}'\n")
            assert "workqueue_connected 1.0" in get(port, "/metrics")[1]
        idle.settimeout(30)
        assert idle.recv(1) == b""  # dropped by the server after its request timeout, not held forever
    assert "Traceback" not in worker.output and "TimeoutError" not in worker.output, worker.output
