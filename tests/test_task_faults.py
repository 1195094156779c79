"""Faults of the task itself: a task that hangs, a task that kills its process, retries that
wait, and the dead-letter queue read and replayed with dead_letters.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pika
import pytest
from conftest import (
    ROOT,
    done_tasks,
    get_all,
    publish,
    rabbitmq_version,
    ready_count,
    run_script,
    start_worker,
    wait_for_counts,
    wait_until,
)

import workqueue
from workqueue import Producer

pytestmark = pytest.mark.queue_semantics

SOCKET_TASK = """
import socket

def read_forever(body):
    if body == b"hang":  # a blocking read from a peer that never writes, and no timeout
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        client.recv(1)
"""


def dead_letters(broker, queue: str) -> list[tuple[bytes, dict]]:
    return get_all(broker, queue + ".dlq")


# --- 1. Time limits -------------------------------------------------------------------


def test_a_worker_killed_while_it_replaces_a_child_leaves_no_traceback(env, queue, start, broker):
    """kill -9 right after a time limit killed a child: the replacement child, still starting, finds the
    worker gone before it could ask to die with it; it ends quietly (it printed a BrokenPipeError)."""
    worker = start_worker(start, queue, "--time-limit", "1", "--max-retries", "0")
    publish(env, queue, "hang")
    worker.wait_for(r"Failed 'hang': time limit of 1 s exceeded; moved to ", timeout=30)
    worker.kill()
    worker.reader.join(timeout=60)  # until every process that held its output (the new child) has ended
    assert not worker.reader.is_alive(), "a child process outlived the worker by a minute"
    assert "Traceback" not in worker.output and "Error" not in worker.output.split("moved to")[-1], worker.output


@pytest.mark.parametrize("blocked_in", ["sleep", "socket read"])
def test_a_task_blocked_in_a_system_call_is_stopped_at_the_time_limit(env, queue, start, broker, tmp_path, blocked_in):
    task = ("--task", "slow:read_forever") if blocked_in == "socket read" else ()
    (tmp_path / "slow.py").write_text(SOCKET_TASK)
    worker = start_worker(
        start, queue, "--time-limit", "1", "--max-retries", "1", "--retry-delays", "0", *task, cwd=tmp_path
    )
    publish(env, queue, "hang", "next")

    worker.wait_for(r"Failed 'hang': time limit of 1 s exceeded; retry 1 of 1 now", timeout=30)
    worker.wait_for(r"Failed 'hang': time limit of 1 s exceeded; moved to ", timeout=30)
    worker.wait_for(r"Done 'next'")
    wait_for_counts(broker, queue, 0, 0)
    ((body, headers),) = dead_letters(broker, queue)
    assert body == b"hang" and headers["x-error"] == "time limit of 1 s exceeded"
    assert worker.proc.poll() is None


def test_time_limit_with_thread_isolation_is_refused(env, queue):
    result = run_script("worker.py", "--queue", queue, "--time-limit", "5", "--isolation", "thread", env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--time-limit needs --isolation process" in result.stderr


# --- 2. Crash loops bounded --------------------------------------------------------------


def test_a_task_that_kills_its_child_process_fails_and_is_dead_lettered(env, queue, start, broker):
    worker = start_worker(start, queue, "--isolation", "process", "--max-retries", "2", "--retry-delays", "0")
    publish(env, queue, "ok1.", "crash", "ok2.")

    worker.wait_for(r"Failed 'crash': killed by signal 9 \(SIGKILL\); moved to ", timeout=30)
    assert worker.count(r"Received 'crash'") == 3  # max-retries + 1 starts, no more
    worker.wait_for(r"Done 'ok2\.'")
    assert sorted(done_tasks(worker)) == ["ok1.", "ok2."]
    wait_for_counts(broker, queue, 0, 0)
    ((body, headers),) = dead_letters(broker, queue)
    assert body == b"crash" and headers["x-error"] == "killed by signal 9 (SIGKILL)"
    assert worker.proc.poll() is None


def test_a_task_that_kills_the_worker_kills_it_once_then_runs_in_a_child(env, queue, start, broker):
    """Workers in thread mode die with the task; the test restarts them as a service manager would. The
    task came back unacked: the next worker runs it in a child process, where its death is a failure."""
    publish(env, queue, "ok1.", "crash", "ok2.")
    w1 = start_worker(start, queue, "--max-retries", "2", "--retry-delays", "0")
    assert w1.wait(timeout=30) == -signal.SIGKILL
    w2 = start_worker(start, queue, "--max-retries", "2", "--retry-delays", "0", name="w2")
    w2.wait_for(r"Failed 'crash': killed by signal 9 \(SIGKILL\); moved to ")
    assert w2.count(r"Received 'crash'.* \(in a child process\)") == 3  # max-retries + 1 runs, each in a child
    w2.wait_for(r"Done 'ok2\.'")
    assert sorted(done_tasks(w1, w2)) == ["ok1.", "ok2."] and w2.proc.poll() is None
    wait_for_counts(broker, queue, 0, 0)
    listed = run_script("dead_letters.py", "list", "--queue", queue, env=env)
    assert "3 failed runs" in listed.stdout, listed.stdout
    ((body, headers),) = dead_letters(broker, queue)
    assert body == b"crash" and headers["x-error"] == "killed by signal 9 (SIGKILL)"
    assert (headers["x-retries"], headers["x-crashes"]) == (2, 3)


# A task that came back without an ack was not necessarily the cause: the worker may have died of another
# task, or handed it back unstarted. Each release counts some of these in x-delivery-count (docs/reliability.md's
# table); none of them may count against the task as a failure. Each test below has --max-retries 0, where
# a single count would dead-letter it (as it did before: the crash-loop guard read --max-retries).


def test_tasks_a_crash_took_down_with_it_run_and_are_not_dead_lettered(env, queue, start, broker):
    publish(env, queue, "crash", "ok1.", "ok2.")
    w1 = start_worker(start, queue, "--prefetch", "3", "--max-retries", "0")  # holds all three, runs one at a time
    assert w1.wait(timeout=30) == -signal.SIGKILL
    w2 = start_worker(start, queue, "--max-retries", "0", name="w2")
    w2.wait_for(r"Done '", count=2)
    w2.wait_for(r"Failed 'crash': killed by signal 9 \(SIGKILL\); moved to ")
    assert sorted(done_tasks(w2)) == ["ok1.", "ok2."], w2.output
    # w1 held them when it died (the broker sent all three at once): they came back, and ran
    assert w2.count(r"Received 'ok\d\.' \(redelivered\)") == 2, w2.output
    wait_for_counts(broker, queue, 0, 0)
    assert [body for body, _ in dead_letters(broker, queue)] == [b"crash"]


def test_tasks_a_warm_shutdown_handed_back_run_and_are_not_dead_lettered(env, queue, start, broker, gate):
    publish(env, queue, *(f"task{n}" for n in range(1, 7)))
    w1 = start_worker(start, queue, "--prefetch", "6", *gate.task, cwd=gate.folder)
    w1.wait_for(r"Received 'task1'")
    wait_for_counts(broker, queue, 0, 6)  # one running, five held
    w1.signal(signal.SIGINT)
    w1.wait_for(r"Handed back 'task6'")
    gate.open()
    assert w1.wait() == 0
    w2 = start_worker(start, queue, "--max-retries", "0", *gate.task, name="w2", cwd=gate.folder)
    w2.wait_for(r"Done '", count=5)
    assert sorted(done_tasks(w1, w2)) == [f"task{n}" for n in range(1, 7)], w2.output
    wait_for_counts(broker, queue, 0, 0)
    assert dead_letters(broker, queue) == []


def patient(env: dict, broker) -> dict:
    """For a worker the test pauses (SIGSTOP): it answers no heartbeat, and on the test node's 2 s it would be cut
    off while the machine is busy."""
    return {**env, "AMQP_URL": f"{broker.url}?heartbeat=60"}


@pytest.mark.parametrize("padding", [0, 150_000], ids=["small", "150KB"])  # pika reads 100 KB a poll at most
def test_a_warm_shutdown_hands_back_the_tasks_pika_had_read_itself(env, queue, start, broker, padding):
    """Tasks the broker had sent when the stop came, waiting in the worker's socket or read by pika and not yet
    handed to the worker's callback: the worker hands each back itself (a nack, in its output), and pika rejects
    none behind its back (4.3 counts a reject toward the delivery limit and the crash-loop guard, not a nack)."""
    worker = start_worker(start, queue, "--prefetch", "5", env=patient(env, broker))
    worker.signal(signal.SIGSTOP)  # it reads nothing: the five deliveries wait in its socket
    sent = [f"task{n}.{' ' * padding}" for n in range(1, 6)]
    publish(env, queue, *sent)
    wait_for_counts(broker, queue, 0, 5)  # all five sent to it
    worker.signal(signal.SIGTERM)  # held until it runs again: it stops as it reads the five
    worker.signal(signal.SIGCONT)
    assert worker.wait() == 0
    assert sorted(re.findall(r"Handed back '(task\d)\.", worker.output)) == [f"task{n}" for n in range(1, 6)], (
        worker.output
    )
    left = get_all(broker, queue)
    assert sorted(body for body, _ in left) == [task.encode() for task in sent]
    if rabbitmq_version(broker) >= (4, 3):  # nacks only: none counted
        assert [headers.get("x-delivery-count", 0) for _, headers in left] == [0] * 5, left


def test_tasks_that_end_as_a_warm_shutdown_lands_are_all_acked(env, queue, start, broker):
    """Two tasks end as the stop arrives (the worker, paused past their end, sees both at once): both are acked
    once the consumer is cancelled, and neither goes back to the queue."""
    publish(env, queue, "a.", "b.")
    worker = start_worker(start, queue, "--concurrency", "2", "--dot-seconds", "1", env=patient(env, broker))
    wait_until(lambda: worker.count(r"Received '[ab]\.'") == 2, 30, "both tasks running", details=lambda: worker.output)
    worker.signal(signal.SIGSTOP)
    time.sleep(1.5)  # past both tasks' second of work: they end as soon as it runs again
    worker.signal(signal.SIGTERM)
    worker.signal(signal.SIGCONT)
    assert worker.wait() == 0
    assert sorted(done_tasks(worker)) == ["a.", "b."], worker.output
    assert "Could not ack" not in worker.output
    wait_for_counts(broker, queue, 0, 0)


def test_tasks_left_over_at_max_tasks_run_and_are_not_dead_lettered(env, queue, start, broker):
    publish(env, queue, *(f"task{n}" for n in range(1, 6)))
    for run in (1, 2):  # pika rejects the deliveries that arrive after its cancel: 4.3 counts rejects too
        worker = start_worker(start, queue, "--max-tasks", "1", "--prefetch", "5", name=f"r{run}")
        assert worker.wait() == 0
    w3 = start_worker(start, queue, "--max-retries", "0", name="w3")
    w3.wait_for(r"Done '", count=3)
    wait_for_counts(broker, queue, 0, 0)
    assert dead_letters(broker, queue) == [], w3.output
    assert len(done_tasks(w3)) == 3


@pytest.mark.queue_semantics
def test_a_recycled_worker_takes_no_more_than_it_will_start_so_nothing_goes_back(env, queue, start, broker):
    """--max-tasks 1 --prefetch 5, four times over a backlog (a worker recycled after every task): each asks the
    broker for one task at a time, so none is sent back unrun (pika rejected four each time, and every
    release counts a reject toward the delivery limit and the crash-loop guard)."""
    publish(env, queue, *(f"task{n}" for n in range(1, 11)))
    for run in range(1, 5):
        worker = start_worker(start, queue, "--max-tasks", "1", "--prefetch", "5", name=f"r{run}")
        assert worker.wait() == 0
        assert worker.count(r"Received '") == 1, worker.output
    wait_for_counts(broker, queue, 6, 0)
    left = get_all(broker, queue)
    assert [body for body, _ in left] == [f"task{n}".encode() for n in range(5, 11)]
    assert [headers.get("x-delivery-count", 0) for _, headers in left] == [0] * 6, left


# --- 3. Retries that wait ------------------------------------------------------------------


def test_each_retry_waits_its_delay_and_the_last_delay_repeats(env, queue, start, broker):
    worker = start_worker(start, queue, "--max-retries", "3", "--retry-delays", "1,2")
    publish(env, queue, "an error")

    worker.wait_for(r"Failed 'an error': .*retry 1 of 3 in 1s \(at \d\d:\d\d:\d\d, waiting in .*\.retry\.1s\)")
    worker.wait_for(r"Failed 'an error': .*moved to ", timeout=30)
    starts = worker.times(r"Received 'an error'")
    failures = worker.times(r"Failed 'an error'")
    assert len(starts) == 4, worker.output
    waits = [start - failed for failed, start in zip(failures, starts[1:])]
    for waited, delay in zip(waits, (1, 2, 2)):
        # No earlier than its delay (less the time to print and read a line), and not much later.
        assert delay - 0.1 <= waited <= delay + 2.5, (waits, worker.output)


def test_a_waiting_retry_is_held_by_no_worker(env, queue, start, broker):
    worker = start_worker(start, queue, "--max-retries", "1", "--retry-delays", "4")
    publish(env, queue, "an error")
    worker.wait_for(r"retry 1 of 1 in 4s")
    wait_until(lambda: ready_count(broker.url, queue + ".retry.4s") == 1, timeout=3, what="the task in the wait queue")
    wait_for_counts(broker, queue, 0, 0)  # not unacked at the worker
    worker.wait_for(r"Received 'an error' \(attempt 2 of 2\)", timeout=15)


def test_a_worker_killed_during_a_wait_loses_nothing(env, queue, start, broker):
    first = start_worker(start, queue, "--max-retries", "1", "--retry-delays", "3", name="w1")
    publish(env, queue, "an error")
    first.wait_for(r"retry 1 of 1 in 3s")
    first.kill()

    second = start_worker(start, queue, "--max-retries", "1", "--retry-delays", "3", name="w2")
    second.wait_for(r"Received 'an error' \(attempt 2 of 2\)", timeout=20)
    second.wait_for(r"Failed 'an error': .*moved to ")
    assert [body for body, _ in dead_letters(broker, queue)] == [b"an error"]


def test_a_broker_restart_during_a_wait_loses_nothing(env, queue, start, running_broker):
    worker = start_worker(start, queue, "--max-retries", "1", "--retry-delays", "2")
    publish(env, queue, "an error")
    worker.wait_for(r"retry 1 of 1 in 2s")
    running_broker.restart()  # the delay runs out while the broker is down

    worker.wait_for(r"Received 'an error' \(attempt 2 of 2\)", timeout=60)
    worker.wait_for(r"Failed 'an error': .*moved to ")
    dead = [body for body, _ in dead_letters(running_broker, queue)]
    # Nothing lost. A second copy only when the stop cut off the ack of the first run (an ack is not
    # confirmed): the broker then ran it again, and the worker's line said "redelivered" (seen once, 4.0).
    assert dead == [b"an error"] or (dead == [b"an error"] * 2 and "(redelivered)" in worker.output), (
        dead,
        worker.output,
    )


# --- 4. dead_letters.py ------------------------------------------------------------------


def make_dead(env, queue, start, *bodies: str) -> None:
    worker = start_worker(start, queue, "--max-retries", "0", "--max-tasks", str(len(bodies)), name="maker")
    publish(env, queue, *bodies)
    assert worker.wait(timeout=30) == 0


def test_list_shows_every_dead_task_and_takes_none(env, queue, start, broker):
    make_dead(env, queue, start, "an error 1", "an error \x1b[2J 2", "an error 3")
    listed = run_script("dead_letters.py", "list", "--queue", queue, env=env)
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert re.search(r"^   1  'an error 1'  id [0-9a-f-]{36}$", out, re.M)  # new_task.py gave it its id
    assert "'an error \\x1b[2J 2'" in out and "\x1b" not in out
    assert out.count("TaskFailed: the task says 'error'") == 3
    assert re.search(rf"1 failed run, from '{queue}', died \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", out)
    assert out.splitlines()[-1] == f" [x] 3 dead tasks in '{queue}.dlq'; none was taken"
    limited = run_script("dead_letters.py", "list", "--queue", queue, "--limit", "1", env=env)
    assert limited.stdout.count("TaskFailed") == 1
    assert limited.stdout.endswith(f" [x] 3 dead tasks in '{queue}.dlq', 1 shown; none was taken\n")
    # Nothing consumed, nothing reordered:
    assert [body for body, _ in dead_letters(broker, queue)] == [b"an error 1", b"an error \x1b[2J 2", b"an error 3"]


def test_list_into_a_reader_that_goes_away_stops_quietly_and_takes_nothing(env, queue, broker):
    """`dead_letters.py list | head -2`: exit 141 (as a process that SIGPIPE ends), no error, no traceback.
    2,000 dead tasks: more lines than a pipe holds, so that the reader's going away is seen."""
    count = 2000
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        workqueue.declare_dead_letter_queue(connection, queue, "quorum")  # as the worker declares it
        channel = connection.channel()
        channel.confirm_delivery()
        for i in range(count):
            headers = {"x-original-queue": queue, "x-error": "boom " * 20, "x-retries": 0}
            channel.basic_publish("", queue + ".dlq", f"dead {i}".encode(), pika.BasicProperties(headers=headers))
    with subprocess.Popen(
        [sys.executable, str(ROOT / "dead_letters.py"), "list", "--queue", queue],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as lister:  # fmt: skip
        first = [lister.stdout.readline() for _ in range(2)]
        lister.stdout.close()  # as head does after its lines
        assert lister.wait(timeout=60) == 141
        assert lister.stderr.read() == ""
    assert first[0].startswith("   1  'dead 0'")
    wait_for_counts(broker, queue + ".dlq", count, 0)  # nothing taken


def test_replay_puts_dead_tasks_back_with_a_fresh_count(env, queue, start, broker, tmp_path):
    make_dead(env, queue, start, "an error 1", "an error 2")
    replayed = run_script("dead_letters.py", "replay", "--queue", queue, env=env)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == f" [x] Replayed 2 dead tasks to '{queue}'\n"
    wait_for_counts(broker, queue + ".dlq", 0, 0)
    back = get_all(broker, queue)
    assert [body for body, _ in back] == [b"an error 1", b"an error 2"]
    for _, headers in back:
        assert not {"x-retries", "x-error", "x-original-queue", "x-failed-at"} & set(headers)

    # The cause fixed (a task that accepts them now), a replayed task is done like any other.
    (tmp_path / "fixed.py").write_text("def run(body):\n    pass\n")
    make_dead(env, queue, start, "an error 3")
    assert run_script("dead_letters.py", "replay", "--queue", queue, env=env).returncode == 0
    worker = start_worker(start, queue, "--task", "fixed:run", "--max-tasks", "1", cwd=tmp_path)
    assert worker.wait(timeout=30) == 0
    assert done_tasks(worker) == ["an error 3"]


def test_a_tasks_id_follows_it_through_retries_the_dead_letter_queue_and_a_replay(env, queue, start, broker):
    """The id Producer.send() returns is in the worker's lines, on the retry and the dead letter, in
    `dead_letters.py list`, and on the task a replay puts back. A task that came without one (the
    tutorial's new_task.py sets none) gets one at its first failure, and keeps it."""
    with Producer(broker.url, queue) as producer:
        task_id = producer.send("an error")
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        connection.channel().basic_publish("", queue, b"an error, no id", pika.BasicProperties(delivery_mode=2))
    worker = start_worker(start, queue, "--max-retries", "1", "--retry-delays", "0", "--max-tasks", "4")
    assert worker.wait(timeout=30) == 0, worker.output
    short = re.escape(task_id[:8])
    assert worker.count(rf"Failed 'an error': .*; retry 1 of 1 now \[id {short}\]") == 1, worker.output
    assert worker.count(rf"Failed 'an error': .*; moved to {re.escape(queue)}\.dlq \[id {short}\]") == 1
    made = re.findall(r"Failed 'an error, no id': .*\[id ([0-9a-f]{8})\]", worker.output)
    assert len(made) == 2 and made[0] == made[1], worker.output  # one id, kept from the first failure on

    listed = run_script("dead_letters.py", "list", "--queue", queue, env=env)
    assert f"'an error'  id {task_id}" in listed.stdout, listed.stdout
    assert re.search(rf"'an error, no id'  id {made[0]}[0-9a-f-]{{28}}$", listed.stdout, re.M), listed.stdout
    assert run_script("dead_letters.py", "replay", "--queue", queue, env=env).returncode == 0
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        _method, properties, body = connection.channel().basic_get(queue, auto_ack=True)
    assert body == b"an error" and properties.message_id == task_id


def test_replay_interrupted_loses_nothing(env, queue, start, broker):
    count = 3000
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_declare(queue + ".dlq", durable=True, arguments={"x-queue-type": "quorum"})
        channel.confirm_delivery()  # each one taken: unconfirmed, the count once never came (a CI run under load)
        for i in range(count):
            channel.basic_publish(
                "",
                queue + ".dlq",
                str(i).encode(),
                pika.BasicProperties(delivery_mode=2, headers={"x-original-queue": queue, "x-error": "boom"}),
            )
    wait_until(lambda: ready_count(broker.url, queue + ".dlq") == count, timeout=30, what="the dead letters")
    replay = start("dead_letters.py", "replay", "--queue", queue)
    wait_until(lambda: ready_count(broker.url, queue) >= 200, timeout=60, what="a part of the replay")
    replay.kill()

    # Nothing held unacked: the killed replay's unacked dead letters are back (its ready count grows meanwhile).
    wait_until(lambda: broker.queue_counts(queue + ".dlq")[1] == 0, timeout=30, what="no dead letter unacked")
    work = [int(body) for body, _ in get_all(broker, queue)]
    dead = [int(body) for body, _ in get_all(broker, queue + ".dlq")]
    assert 200 <= len(work) < count
    assert set(work) | set(dead) == set(range(count))  # nothing lost; a task may be in both
    assert len(work) + len(dead) <= count + 1


def test_purge_and_a_missing_queue(env, queue, start, broker):
    make_dead(env, queue, start, "an error")
    purged = run_script("dead_letters.py", "purge", "--queue", queue, env=env)
    assert purged.returncode == 0 and purged.stdout == f" [x] Purged 1 dead task from '{queue}.dlq'\n"
    assert dead_letters(broker, queue) == []
    missing = run_script("dead_letters.py", "list", "--queue", "no_such_queue", env=env)
    assert missing.returncode == 7 and missing.stderr.count("\n") == 1
    assert "no queue named 'no_such_queue.dlq'" in missing.stderr


# --- 4. Child processes and stops ---------------------------------------------------------------


def test_a_stop_signalled_to_the_whole_process_group_finishes_the_running_task(env, queue, start, broker):
    """systemd's default KillMode=control-group (and a container runtime) sends SIGTERM to every process:
    the child running a task ignores it, and the worker's warm shutdown finishes and acks the task."""
    worker = start_worker(start, queue, "--isolation", "process", "--dot-seconds", "1")
    publish(env, queue, "stop...")
    worker.wait_for(r"Received 'stop\.\.\.'")
    os.killpg(worker.proc.pid, signal.SIGTERM)  # the worker leads its own group (conftest starts it so)
    assert worker.wait(timeout=30) == 0, worker.output
    assert "Done 'stop...'" in worker.output and "killed by signal" not in worker.output, worker.output
    wait_for_counts(broker, queue, 0, 0)
    assert ready_count(broker.url, queue + ".retry.1s") == 0 and ready_count(broker.url, queue + ".dlq") == 0


DIES_IN_THE_CHILD = """
import multiprocessing, os

if multiprocessing.parent_process() is not None:  # in a child process: die while starting
    os._exit(3)

def work(body):
    pass
"""


def test_a_worker_whose_child_processes_cannot_start_takes_no_task(env, queue, start, broker, tmp_path):
    """Every task would fail in milliseconds, for the worker's fault, and be dead-lettered as its own:
    the worker takes none, says why in one line and exits 10; the tasks stay in the queue."""
    (tmp_path / "dies.py").write_text(DIES_IN_THE_CHILD)
    publish(env, queue, "first", "second")
    worker = start("worker.py", "--queue", queue, "--task", "dies:work", "--isolation", "process", cwd=tmp_path)
    assert worker.wait(timeout=60) == 10
    assert worker.output.strip().splitlines()[-1] == (
        "worker.py: error: cannot run tasks: the child process to run it died while starting: "
        "its process exited with code 3"
    ), worker.output
    assert "Received" not in worker.output and "EOFError" not in worker.output
    wait_for_counts(broker, queue, 2, 0)  # untouched: never delivered


BREAKS_LATER = """
import multiprocessing, os

if multiprocessing.parent_process() is not None and os.path.exists("broken"):  # a child, once broken
    os._exit(3)

def work(body):
    if body == b"crash":
        os.kill(os.getpid(), 9)
"""


def test_a_worker_whose_child_processes_stop_starting_hands_the_task_back_and_exits(
    env, queue, start, broker, tmp_path
):
    """A child that cannot start after a crash (here: the module fails to load from now on) is the worker's
    fault: the task it was for goes back untouched, no other starts, and the worker exits 10."""
    (tmp_path / "breaks.py").write_text(BREAKS_LATER)
    worker = start_worker(
        start, queue, "--task", "breaks:work", "--isolation", "process", "--max-retries", "0", cwd=tmp_path
    )
    publish(env, queue, "fine")
    worker.wait_for(r"Done 'fine'")
    (tmp_path / "broken").touch()
    publish(env, queue, "crash", "next", "last")
    assert worker.wait(timeout=60) == 10, worker.output
    assert "Failed 'crash': killed by signal 9" in worker.output  # its own fault: dead-lettered
    assert "cannot run tasks: the child process to run it died while starting" in worker.output
    assert "Done 'next'" not in worker.output and "Failed 'next'" not in worker.output
    wait_for_counts(broker, queue, 2, 0)
    assert sorted(body for body, _ in get_all(broker, queue)) == [b"last", b"next"]
    assert [body for body, _ in dead_letters(broker, queue)] == [b"crash"]


def test_a_dead_letter_outlives_the_expiration_its_producer_gave_the_task(env, queue, start, broker):
    """A producer's per-message TTL (expiration) is for the wait before the task is taken: copied onto
    the dead letter, it would make the broker drop it from the dead-letter queue unseen."""
    worker = start_worker(start, queue, "--max-retries", "0")  # first: the task must not expire in the queue
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.confirm_delivery()
        channel.basic_publish("", queue, b"an error", pika.BasicProperties(expiration="1500", delivery_mode=2))
    worker.wait_for(r"Failed 'an error': TaskFailed: the task says 'error'; moved to ")
    moved = time.monotonic()
    while time.monotonic() < moved + 3:  # twice the expiration: the broker would have dropped it by now
        assert ready_count(broker.url, queue + ".dlq") == 1, "the dead letter expired"
        time.sleep(0.25)
    assert [body for body, _ in dead_letters(broker, queue)] == [b"an error"]


def test_a_task_past_a_lowered_max_retries_runs_its_attempt(env, queue, start, broker):
    """x-retries counts failures, and bounds only failures: a task that failed 4 times under --max-retries 5
    and arrives at a worker with --max-retries 3 runs (once), it is not dead-lettered unrun."""
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.confirm_delivery()
        for body in (b"fine", b"an error"):
            channel.basic_publish("", queue, body, pika.BasicProperties(headers={"x-retries": 4}, delivery_mode=2))
    worker = start_worker(start, queue, "--max-retries", "3")
    worker.wait_for(r"Received 'fine' \(attempt 5 past --max-retries\)")
    worker.wait_for(r"Done 'fine'")
    worker.wait_for(r"Failed 'an error': TaskFailed: the task says 'error'; moved to ")
    assert "came back 0 times" not in worker.output
    ((body, headers),) = dead_letters(broker, queue)
    assert body == b"an error" and headers["x-retries"] == 4 and "x-unfinished-runs" not in headers


HOLDS_THEN_BREAKS = """
import multiprocessing, os, time

if multiprocessing.parent_process() is not None and os.path.exists("broken"):  # a child, once broken
    os._exit(3)

def work(body):
    if body == b"crash":
        os.kill(os.getpid(), 9)
    deadline = time.monotonic() + 60
    while body == b"slow" and not os.path.exists("release") and time.monotonic() < deadline:
        time.sleep(0.05)
"""


def test_a_worker_that_gave_up_finishes_its_running_task_on_a_stop_and_still_exits_10(
    env, queue, start, broker, tmp_path
):
    """Giving up is a warm shutdown the worker asks of itself, not a signal: the supervisor's SIGTERM that
    follows is a first one (warm: the running task finishes and is acked), and the exit says why, 10."""
    (tmp_path / "holds.py").write_text(HOLDS_THEN_BREAKS)
    worker = start_worker(
        start, queue, "--task", "holds:work", "--isolation", "process", "--concurrency", "2", "--max-retries", "0",
        cwd=tmp_path,
    )  # fmt: skip
    (tmp_path / "broken").touch()  # its two children are ready: no new one starts from now on
    publish(env, queue, "slow", "crash", "next")
    worker.wait_for(r"cannot run tasks: the child process to run it died while starting")
    worker.signal(signal.SIGTERM)
    worker.wait_for(r"Warm shutdown")
    (tmp_path / "release").touch()
    assert worker.wait(timeout=60) == 10, worker.output
    assert "Done 'slow'" in worker.output and "Cold shutdown" not in worker.output
    wait_for_counts(broker, queue, 1, 0)  # 'next', handed back; 'slow' acked, 'crash' dead-lettered
    assert [body for body, _ in dead_letters(broker, queue)] == [b"crash"]
