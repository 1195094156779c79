"""Real faults on a real broker: long tasks, cut connections, broker restarts,
failing tasks, shutdown signals, a queue deleted under a worker, and TLS.

Each test checks what a user would: every task done (at least once), nothing
left ready or unacknowledged, failed tasks in the dead-letter queue, and the
worker alive or gone with the right exit code.
"""

from __future__ import annotations

import re
import signal
import subprocess
from urllib.parse import quote

import pika
import pytest
from conftest import (
    HEARTBEAT,
    done_tasks,
    get_all,
    publish,
    ready_count,
    run_script,
    start_worker,
    wait_for_counts,
    wait_until,
)

import workqueue.producer
from local_broker import TcpProxy


def all_bodies(broker, queue: str) -> list[bytes]:
    """Take every message off a queue with a fast consumer."""
    bodies = []
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=2000)
        for method, _properties, body in channel.consume(queue, inactivity_timeout=2):
            if method is None:
                break
            bodies.append(body)
            channel.basic_ack(method.delivery_tag)
        channel.cancel()
    return bodies


@pytest.fixture
def proxy(broker):
    proxy = TcpProxy(broker.port)
    yield proxy
    proxy.close()


# --- 1. Long tasks --------------------------------------------------------------
@pytest.mark.queue_semantics
def test_a_task_longer_than_two_heartbeats_is_done_exactly_once(env, queue, start, broker):
    task = "long" + "." * 6  # 6 s of work; the broker drops a silent client after 2 x 2 s
    assert 2 * HEARTBEAT < 6
    worker = start_worker(start, queue, "--dot-seconds", "1", "--max-tasks", "1")
    publish(env, queue, task)
    assert worker.wait(timeout=60) == 0
    assert done_tasks(worker) == [task]
    assert "connection lost" not in worker.output
    wait_for_counts(broker, queue, 0, 0)


# --- 2. Reconnect ---------------------------------------------------------------


def test_worker_reconnects_after_the_connection_is_cut(env, queue, start, broker, proxy):
    worker = start_worker(start, queue, "--url", proxy.url(), "--dot-seconds", "1")
    publish(env, queue, "cut...")
    worker.wait_for(r"Received 'cut")
    proxy.cut()

    worker.wait_for(r"connection lost: .*; reconnecting \(1 task still running: its ack is lost")
    worker.wait_for(r"Could not ack 'cut\.\.\.': its connection is gone")
    worker.wait_for(r"Received 'cut\.\.\.' \(redelivered\)")
    worker.wait_for(r"Done 'cut\.\.\.'")
    publish(env, queue, "after")
    worker.wait_for(r"Done 'after'")
    assert worker.proc.poll() is None
    assert proxy.accepted >= 2
    wait_for_counts(broker, queue, 0, 0)


def test_max_tasks_counts_tasks_started_not_deliveries_dropped_with_a_cut_connection(env, queue, start, broker, proxy):
    # Three tasks arrive at once; the cut comes while the first runs: the other two never start, the
    # broker has them back, and --max-tasks 3 still means three starts (the first one's, run again, counts).
    worker = start_worker(
        start, queue, "--url", proxy.url(), "--dot-seconds", "1", "--max-tasks", "3", "--prefetch", "3"
    )
    publish(env, queue, "t1..", "t2.", "t3.", "t4.", "t5.")
    worker.wait_for(r"Received 't1\.\.'")
    proxy.cut()

    assert worker.wait(timeout=60) == 0, worker.output
    assert worker.count(r"Received '") == 3, worker.output
    # Which two: t1 and t2 when the broker has the cut connection's tasks back before the worker consumes
    # again; t4 and t5 when it notices the cut later (a loaded run). Either way two done, three left.
    assert len(done_tasks(worker)) == 2, worker.output
    wait_for_counts(broker, queue, 3, 0)


def test_a_worker_that_took_its_max_tasks_exits_when_its_last_task_ends_even_while_the_broker_is_gone(
    env, queue, start, broker, proxy
):
    worker = start_worker(start, queue, "--url", proxy.url(), "--dot-seconds", "1", "--max-tasks", "1")
    publish(env, queue, "last..")
    worker.wait_for(r"Received 'last\.\.'")
    proxy.close()  # the broker is out of reach from now on: a reconnect cannot take another task anyway

    assert worker.wait(timeout=30) == 0, worker.output
    assert "Could not ack 'last..': its connection is gone" in worker.output
    wait_for_counts(broker, queue, 1, 0)  # back in the queue, for the next worker


def test_workers_and_producer_ride_out_a_broker_restart(queue, start, running_broker, tmp_path):
    count = 3000
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"task{i}.\n" for i in range(count)))
    workers = [start_worker(start, queue, "--dot-seconds", "0.002", name=f"w{n}") for n in (1, 2)]
    producer = start("new_task.py", "--queue", queue, "--file", str(tasks))
    workers[0].wait_for(r"Done 'task", count=20)

    running_broker.restart()

    assert producer.wait(timeout=120) == 0, producer.output
    assert f"Sent {count:,} messages, all confirmed" in producer.output
    for worker in workers:
        # A graceful stop usually reaches a client as "320 CONNECTION_FORCED", but under load as a reset.
        worker.wait_for(r"connection lost: ", timeout=30)
        worker.wait_for(r"Waiting for messages", count=2, timeout=60)  # consuming again
    expected = {f"task{i}." for i in range(count)}
    # Poll the workers' own reports: right after a restart the broker's counts can read 0 too early.
    wait_until(lambda: set(done_tasks(*workers)) >= expected, timeout=120, what="every task to be done")
    assert set(done_tasks(*workers)) == expected
    wait_for_counts(running_broker, queue, 0, 0)
    assert all(worker.proc.poll() is None for worker in workers)


def test_a_broker_that_hangs_up_during_the_login_is_retried_not_taken_for_a_wrong_password(
    env, queue, start, broker, proxy
):
    """A broker that is stopping ends new connections as they log in; pika calls that a probable
    authentication error. Worker and producer retry it (exit 4 is for a refusal the broker states)."""
    proxy.hang_up_at_login(2)
    worker = start_worker(start, queue, "--url", proxy.url())
    worker.wait_for(r"Waiting for messages", timeout=30)
    proxy.hang_up_at_login(2)
    producer = run_script("new_task.py", "--queue", queue, "--url", proxy.url(), "hello.", env=env)
    assert producer.returncode == 0, producer.stderr
    worker.wait_for(r"Done 'hello\.'")
    assert proxy.accepted >= 6 and "login refused" not in worker.output + producer.stderr


def test_producer_sends_every_unconfirmed_message_again_after_a_cut(queue, start, broker, proxy, tmp_path):
    count = 150_000
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"{i}\n" for i in range(count)))
    producer = start("new_task.py", "--queue", queue, "--file", str(tasks), "--url", proxy.url())
    wait_until(lambda: ready_count(broker.url, queue) > 5000, timeout=60, what="the first 5000 messages")
    proxy.cut()

    assert producer.wait(timeout=120) == 0, producer.output
    resending = r"connection lost .*; reconnecting, [\d,]+ unconfirmed messages? will be sent again"
    assert re.search(resending, producer.output)
    assert f"Sent {count:,} messages, all confirmed" in producer.output
    resent = int(re.search(r"([\d,]+) were sent again", producer.output)[1].replace(",", ""))
    bodies = all_bodies(broker, queue)
    assert {int(b) for b in bodies} == set(range(count))  # nothing lost
    assert count <= len(bodies) <= count + resent  # duplicates only among the resent


def test_producer_drops_a_connection_whose_broker_stops_answering(queue, start, broker, proxy, tmp_path):
    """No confirm, and no answer to our close either (a stuck node, a link that died but stays open):
    the producer gives up on that connection, reconnects and sends the unconfirmed messages again."""
    count = 50_000
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"{i}\n" for i in range(count)))
    # Without heartbeats, as a node that stops reading but still sends heartbeats would look to pika.
    producer = start("new_task.py", "--queue", queue, "--file", str(tasks), "--url", proxy.url() + "?heartbeat=0")
    wait_until(lambda: ready_count(broker.url, queue) > 2000, timeout=60, what="the first 2000 messages")
    proxy.freeze()

    assert producer.wait(timeout=60) == 0, producer.output
    assert "no confirm from the broker for 15s" in producer.output
    assert re.search(r"no answer to our close for \d+s; dropping the connection", producer.output)
    assert f"Sent {count:,} messages, all confirmed" in producer.output
    resent = int(re.search(r"([\d,]+) were sent again", producer.output)[1].replace(",", ""))
    bodies = all_bodies(broker, queue)
    assert {int(b) for b in bodies} == set(range(count))  # nothing lost
    assert count <= len(bodies) <= count + resent  # duplicates only among the resent (their confirms froze)


def test_producer_waits_while_the_broker_blocks_publishing(queue, start, broker):
    """A memory or disk alarm blocks every publisher until it clears: say so once and wait, however
    long it takes (a silence past the confirm timeout is no reason to reconnect), then go on."""
    broker.rabbitmqctl("set_vm_memory_high_watermark", "0")  # 0: the memory alarm goes off at once
    try:
        producer = start("new_task.py", "--queue", queue, "Held back.")
        producer.wait_for(r"the broker blocked publishing \(low on memory\); waiting until it unblocks")
        with pytest.raises(subprocess.TimeoutExpired):  # still waiting, quietly, past the confirm timeout
            producer.proc.wait(timeout=workqueue.producer.CONFIRM_TIMEOUT + 3)
        assert producer.count(r"\S") == 1, producer.output
    finally:
        broker.rabbitmqctl("set_vm_memory_high_watermark", "0.4")  # the default

    assert producer.wait(timeout=30) == 0, producer.output
    assert "Sent 'Held back.'" in producer.output
    assert "reconnecting" not in producer.output
    assert [body for body, _headers in get_all(broker, queue)] == [b"Held back."]


def test_producer_ends_when_its_quorum_queue_is_deleted_under_a_bulk_publish(env, queue, start, broker, tmp_path):
    """The broker may close the connection, stop reading from it, or return the rest as unroutable:
    whatever it does, the producer ends with one line saying what happened."""
    count = 300_000
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"{i}\n" for i in range(count)))
    producer = start("new_task.py", "--queue", queue, "--file", str(tasks))
    wait_until(lambda: ready_count(broker.url, queue) > 20_000, timeout=60, what="the first 20,000 messages")
    deleted = run_script("delete_queue.py", queue, env=env)
    assert deleted.returncode == 0, deleted.stderr

    code = producer.wait(timeout=90)
    assert "Traceback" not in producer.output
    if code == 0:  # the queue was declared again on a new connection, and the rest went there
        assert f"Sent {count:,} messages, all confirmed" in producer.output
    else:
        assert code == 6, producer.output
        assert re.search(
            r"error: [\d,]+ of [\d,]+ messages? not taken by the broker .* unroutable",
            producer.lines[-1],
        )


# --- 4. Failing tasks -------------------------------------------------------------


@pytest.mark.queue_semantics
@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_a_failing_task_is_retried_then_dead_lettered(env, queue, start, broker, queue_type):
    worker = start_worker(start, queue, "--queue-type", queue_type, "--max-retries", "2", "--retry-delays", "0.3")
    publish(env, queue, "ok1", "an error.", "ok2", extra=("--queue-type", queue_type))

    worker.wait_for(r"Failed 'an error\.': TaskFailed: the task says 'error'; moved to " + re.escape(queue + ".dlq"))
    assert worker.count(r"Failed 'an error\.'") == 3
    assert worker.count(r"Received 'an error\.' \(attempt 2 of 3\)") == 1
    assert worker.count(r"Received 'an error\.' \(attempt 3 of 3\)") == 1
    assert sorted(done_tasks(worker)) == ["ok1", "ok2"]
    wait_for_counts(broker, queue, 0, 0)
    dead = get_all(broker, queue + ".dlq")
    assert [body for body, _ in dead] == [b"an error."]
    assert dead[0][1]["x-error"] == "TaskFailed: the task says 'error'"
    assert dead[0][1]["x-retries"] == 2
    assert worker.proc.poll() is None


# --- 5. Shutdown ------------------------------------------------------------------
@pytest.mark.queue_semantics
def test_first_sigterm_finishes_and_acks_the_current_task(env, queue, start, broker):
    worker = start_worker(start, queue, "--dot-seconds", "1")
    publish(env, queue, "current...", "next")
    worker.wait_for(r"Received 'current")
    worker.signal(signal.SIGTERM)

    assert worker.wait(timeout=30) == 0
    assert "Warm shutdown" in worker.output
    assert done_tasks(worker) == ["current..."]
    wait_for_counts(broker, queue, 1, 0)  # 'next' was never taken
    assert [body for body, _ in get_all(broker, queue)] == [b"next"]


def test_sigusr1_shows_where_a_long_task_is_and_the_worker_goes_on(env, queue, start, broker):
    worker = start_worker(start, queue, "--dot-seconds", "1")
    publish(env, queue, "slow..")
    worker.wait_for(r"Received 'slow")
    worker.signal(signal.SIGUSR1)

    worker.wait_for(r'File ".*worker\.py", line \d+ in sleep_per_dot')  # the task thread, in the task
    worker.wait_for(r"Done 'slow..'")
    wait_for_counts(broker, queue, 0, 0)
    assert worker.proc.poll() is None


@pytest.mark.queue_semantics
def test_second_signal_exits_at_once_and_the_task_goes_back(env, queue, start, broker):
    worker = start_worker(start, queue, "--dot-seconds", "1")
    publish(env, queue, "current" + "." * 30)
    worker.wait_for(r"Received 'current")
    worker.signal(signal.SIGINT)
    worker.wait_for(r"Warm shutdown")
    worker.signal(signal.SIGINT)

    assert worker.wait(timeout=10) == 128 + signal.SIGINT
    assert "Cold shutdown" in worker.output
    assert done_tasks(worker) == []
    wait_for_counts(broker, queue, 1, 0)


# --- 6. Cancelled by the broker ------------------------------------------------------
@pytest.mark.queue_semantics
def test_worker_declares_a_deleted_queue_again_and_resumes(env, queue, start):
    worker = start_worker(start, queue)
    deleted = run_script("delete_queue.py", queue, env=env)
    assert deleted.returncode == 0, deleted.stderr

    worker.wait_for(rf"the broker cancelled our consumer: queue '{queue}' was deleted; declaring it again")
    # 90 s: on a loaded machine 4.0 once refused the new quorum queue (541 INTERNAL_ERROR, closing the
    # connection); the worker reconnects and declares it again, and that is what this waits for.
    worker.wait_for(r"Waiting for messages", count=2, timeout=90)
    publish(env, queue, "after the delete")
    worker.wait_for(r"Done 'after the delete'")
    assert worker.proc.poll() is None


# --- 7. TLS ------------------------------------------------------------------------


def test_tls_with_certificate_verification(env, queue, start, broker, tls_files):
    cacert = tls_files[0]
    tls_url = f"amqps://guest:guest@localhost:{broker.tls_port}/%2F"
    worker = start_worker(start, queue, "--url", tls_url, "--max-tasks", "1", env={**env, "AMQP_CA_FILE": cacert})
    url_with_ca = tls_url + "?ssl_options=" + quote(repr({"ca_certs": cacert}))
    sent = run_script("new_task.py", "--queue", queue, "--url", url_with_ca, "over TLS", env=env)
    assert sent.returncode == 0, sent.stderr
    assert worker.wait(timeout=30) == 0
    assert done_tasks(worker) == ["over TLS"]

    untrusted = run_script("new_task.py", "--queue", queue, "--url", tls_url, "--connect-timeout", "0", "x", env=env)
    assert untrusted.returncode == 3
    assert "certificate verify failed" in untrusted.stderr
