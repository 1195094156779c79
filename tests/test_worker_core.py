"""The worker's core: what a message can carry, deliveries bound to their channel, and --concurrency.

Every message is input from another program: a malformed one becomes a failed task or a clear
line, never a dead thread or a wedged worker. A delivery dies with its channel: one that has
not started is never run from a dead channel, and nothing is acked on a channel it did not come on.
"""

from __future__ import annotations

import re
import signal

import pika
import pytest
from conftest import (
    done_tasks,
    get_all,
    publish,
    run_script,
    start_worker,
    wait_for_counts,
)

from local_broker import TcpProxy


@pytest.fixture
def proxy(broker):
    proxy = TcpProxy(broker.port)
    yield proxy
    proxy.close()


def send_raw(broker, queue: str, body: bytes, properties: pika.BasicProperties) -> None:
    """Publish as another client would, with whatever properties it likes (confirmed)."""
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.confirm_delivery()
        channel.basic_publish("", queue, body, properties)


def received(worker, task: str) -> int:
    return worker.count(rf"\[x\] Received '{re.escape(task)}'")


# --- What a message carries ------------------------------------------------------------


@pytest.mark.queue_semantics
@pytest.mark.parametrize("bad_value", ["oops", -3, True, [1]])
def test_a_malformed_retry_header_does_not_wedge_the_worker(env, queue, start, broker, bad_value):
    worker = start_worker(start, queue, "--max-retries", "1")
    send_raw(broker, queue, b"bad header.", pika.BasicProperties(delivery_mode=2, headers={"x-retries": bad_value}))
    publish(env, queue, "next")

    worker.wait_for(r"Done 'bad header\.'")
    worker.wait_for(r"Done 'next'")
    assert re.search(r"\[!\] ignoring header x-retries=.*: not a count of retries", worker.output), worker.output
    assert "Traceback" not in worker.output
    wait_for_counts(broker, queue, 0, 0)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0


def test_a_retried_and_dead_lettered_task_keeps_its_properties(env, queue, start, broker):
    sent = pika.BasicProperties(
        delivery_mode=2,
        content_type="text/plain",
        content_encoding="utf-8",
        message_id="task-42",
        correlation_id="req-7",
        priority=3,
        timestamp=1_700_000_000,
        type="resize",
        app_id="shop",
        reply_to="answers",
        headers={"tenant": "acme"},
    )
    send_raw(broker, queue, b"an error", sent)  # another client's task, which fails every time
    worker = start_worker(start, queue, "--max-retries", "1", "--retry-delays", "0")
    worker.wait_for(r"Failed 'an error': .*moved to ")
    assert received(worker, "an error") == 2

    dead = _get_one(broker, queue + ".dlq")
    assert dead is not None and dead[2] == b"an error"
    properties = dead[1]
    for name in (
        "delivery_mode",
        "content_type",
        "content_encoding",
        "message_id",
        "correlation_id",
        "priority",
        "timestamp",
        "type",
        "app_id",
        "reply_to",
    ):
        assert getattr(properties, name) == getattr(sent, name), name
    assert properties.headers["tenant"] == "acme"
    assert properties.headers["x-retries"] == 1
    assert properties.headers["x-error"] == "TaskFailed: the task says 'error'"
    assert properties.headers["x-original-queue"] == queue


def _get_one(broker, queue: str):
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        method, properties, body = connection.channel().basic_get(queue, auto_ack=True)
        return None if method is None else (method, properties, body)


def test_control_characters_in_a_body_are_escaped_and_long_bodies_cut(env, queue, start, broker):
    worker = start_worker(start, queue, "--max-tasks", "2", "--max-retries", "0")
    nasty = "\x1b[2J\x1b]0;pwned\x07 clear" + "\r\x9b\x7f"
    publish(env, queue, nasty, "error " + "x" * 200)
    assert worker.wait(timeout=30) == 0
    assert "\x1b" not in worker.output and "\x07" not in worker.output and "\r" not in worker.output
    assert "\x9b" not in worker.output and "\x7f" not in worker.output
    assert r"Received '\x1b[2J\x1b]0;pwned\x07 clear\r\x9b\x7f'" in worker.output
    long_line = next(line for line in worker.output.splitlines() if "Received 'error" in line)
    assert long_line.endswith("…'") and len(long_line) < 90, long_line

    sent = run_script("new_task.py", "--queue", queue, nasty, env=env)  # the producer's echo of it too
    assert sent.returncode == 0 and sent.stdout == " [x] Sent '\\x1b[2J\\x1b]0;pwned\\x07 clear\\r\\x9b\\x7f'\n"


# --- Options that could not hold ------------------------------------------------------------


def test_auto_ack_with_max_tasks_is_refused_with_the_reason(env, queue):
    result = run_script("worker.py", "--queue", queue, "--auto-ack", "--max-tasks", "1", env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "--max-tasks cannot be exact with --auto-ack" in result.stderr


@pytest.mark.queue_semantics
def test_max_tasks_is_exact_at_a_higher_prefetch(env, queue, start, broker):
    publish(env, queue, *[f"t{i}" for i in range(20)])
    worker = start_worker(start, queue, "--prefetch", "10", "--max-tasks", "3")
    assert worker.wait(timeout=30) == 0
    assert len(done_tasks(worker)) == 3
    assert worker.count(r"\[x\] Received") == 3
    wait_for_counts(broker, queue, 17, 0)


# --- Deliveries die with their channel ------------------------------------------------------
@pytest.mark.queue_semantics
def test_a_reconnect_at_prefetch_10_runs_no_stale_delivery(env, queue, start, broker, proxy, gate):
    tasks = [f"t{i}" for i in range(1, 6)]
    worker = start_worker(start, queue, "--url", proxy.url(), "--prefetch", "10", *gate.task, cwd=gate.folder)
    publish(env, queue, *tasks)
    worker.wait_for(r"Received 't1'")
    wait_for_counts(broker, queue, 0, 5)  # all five are at the worker, t1 running (held by the gate)
    proxy.cut()

    worker.wait_for(r"connection lost")
    gate.open()
    for task in tasks:
        worker.wait_for(rf"Done '{re.escape(task)}'", timeout=30)
    wait_for_counts(broker, queue, 0, 0)
    for task in tasks[1:]:  # not started on the dead channel: run once, from the new one
        assert received(worker, task) == 1, worker.output
    assert sorted(done_tasks(worker)) == tasks  # each acked once
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0
    assert "unknown delivery tag" not in worker.output
    assert worker.count(r"connection lost") == 1, worker.output


# --- --concurrency N ---------------------------------------------------------------------


def test_a_tasks_done_line_comes_before_the_next_tasks_received_line(env, queue, start, broker):
    """With more tasks held than threads, a thread starts its next task as soon as one ends: its lines must
    still read in order, Done 'a' before Received 'b' (they came the other way round at the same instant)."""
    tasks = [f"t{n}." for n in range(12)]
    publish(env, queue, *tasks)
    worker = start_worker(start, queue, "--prefetch", "12", "--max-tasks", "12", "--dot-seconds", "0.05")
    assert worker.wait(timeout=60) == 0, worker.output
    events = re.findall(r"\[x\] (Received|Done) '(t\d+\.)'", worker.output)
    assert events == [(event, task) for task in tasks for event in ("Received", "Done")], worker.output


def test_concurrency_runs_n_tasks_at_once(env, queue, start, broker):
    worker = start_worker(start, queue, "--concurrency", "3", "--dot-seconds", "1")
    tasks = ["a...", "b...", "c...", "d."]
    publish(env, queue, *tasks)
    worker.wait_for(r"Received 'c\.\.\.'")
    lines = worker.output.splitlines()
    first_done = next((i for i, line in enumerate(lines) if "[x] Done" in line), len(lines))
    started_before = [line for line in lines[:first_done] if "Received" in line]
    assert len(started_before) == 3, worker.output  # three running at once, before any was done
    assert {re.match(r"(w1/\d) ", line)[1] for line in started_before} == {"w1/1", "w1/2", "w1/3"}
    for task in tasks:
        worker.wait_for(rf"Done '{re.escape(task)}'", timeout=30)
    wait_for_counts(broker, queue, 0, 0)


@pytest.mark.queue_semantics
def test_warm_shutdown_finishes_every_running_task_and_hands_back_the_rest_in_order(env, queue, start, broker, gate):
    # prefetch 6 > concurrency 3: three deliveries wait inside the worker; they go back untouched, in the
    # order they came, so that the next worker takes them in that order.
    worker = start_worker(start, queue, "--concurrency", "3", "--prefetch", "6", *gate.task, cwd=gate.folder)
    tasks = [f"t{i}" for i in range(1, 9)]
    publish(env, queue, *tasks)
    worker.wait_for(r"Received", count=3)
    wait_for_counts(broker, queue, 2, 6)  # three running (held by the gate), three waiting at the worker
    worker.signal(signal.SIGTERM)
    worker.wait_for(r"Warm shutdown")
    gate.open()

    assert worker.wait(timeout=30) == 0
    assert worker.count(r"\[x\] Received") == 3, worker.output
    assert len(done_tasks(worker)) == 3
    handed_back = re.findall(r"Handed back '(t\d)' untouched", worker.output)
    assert handed_back == sorted(handed_back, key=tasks.index) and len(handed_back) == 3, worker.output
    wait_for_counts(broker, queue, 5, 0)
    left = [body.decode() for body, _ in get_all(broker, queue)]
    assert sorted(left) == sorted(set(tasks) - set(done_tasks(worker)))
    # In their order among themselves; where they go among the tasks still waiting is the release's choice.
    assert [t for t in left if t in handed_back] == handed_back, left


SIGINT_AT_THE_END = """
import os, signal

def run(body):
    os.kill(os.getpid(), signal.SIGINT)  # a Ctrl+C that lands as the task ends
"""


def test_a_stop_that_lands_as_the_only_task_ends_finishes_nothing_more(env, queue, start, broker, tmp_path):
    """The task that just ended is not counted among those the warm shutdown still waits for."""
    (tmp_path / "stops.py").write_text(SIGINT_AT_THE_END)
    worker = start_worker(start, queue, "--task", "stops:run", cwd=tmp_path)
    publish(env, queue, "last")
    assert worker.wait(timeout=30) == 0
    assert done_tasks(worker) == ["last"], worker.output
    assert "Finishing" not in worker.output, worker.output
    wait_for_counts(broker, queue, 0, 0)


@pytest.mark.queue_semantics
def test_a_cut_with_n_running_redelivers_each_once_and_acks_nothing_on_the_new_channel(
    env, queue, start, broker, proxy
):
    worker = start_worker(start, queue, "--url", proxy.url(), "--concurrency", "3", "--dot-seconds", "0.5")
    tasks = ["x....", "y....", "z...."]  # 2 s each
    publish(env, queue, *tasks)
    worker.wait_for(r"Received", count=3)
    proxy.cut()

    worker.wait_for(r"connection lost")
    worker.wait_for(r"Could not ack", count=3, timeout=30)
    for task in tasks:
        worker.wait_for(rf"Done '{re.escape(task)}'", timeout=30)
        assert received(worker, task) == 2, worker.output
        assert re.search(rf"Received '{re.escape(task)}' \(redelivered\)", worker.output)
    assert sorted(done_tasks(worker)) == sorted(tasks)
    wait_for_counts(broker, queue, 0, 0)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0
    assert worker.count(r"connection lost") == 1, worker.output


def test_a_failing_task_among_concurrent_ones(env, queue, start, broker):
    worker = start_worker(start, queue, "--concurrency", "3", "--max-retries", "1", "--dot-seconds", "0.3")
    publish(env, queue, "ok1...", "an error.", "ok2...", "ok3.")
    worker.wait_for(r"Failed 'an error\.': .*moved to ")
    for task in ("ok1...", "ok2...", "ok3."):
        worker.wait_for(rf"Done '{re.escape(task)}'")
    wait_for_counts(broker, queue, 0, 0)
    assert [body for body, _ in get_all(broker, queue + ".dlq")] == [b"an error."]
    assert worker.proc.poll() is None


def test_concurrency_sets_prefetch_unless_given(env, queue, start, broker, gate):
    worker = start_worker(start, queue, "--concurrency", "4", *gate.task, cwd=gate.folder)
    publish(env, queue, *[f"p{i}" for i in range(6)])
    worker.wait_for(r"Received", count=4)
    wait_for_counts(broker, queue, 2, 4)  # four running (held by the gate), none more taken: prefetch 4
    worker.signal(signal.SIGTERM)
    gate.open()
    assert worker.wait(timeout=30) == 0
