"""new_task.py --delay / --at (a task that waits in the broker until its time) and --priority high
(a task taken before the waiting ones, on RabbitMQ 4's quorum queues): on a real broker, every release."""

from __future__ import annotations

import re
import subprocess
import time

import pika
import pytest
from conftest import publish, rabbitmq_version, ready_count, run_script, start_worker, wait_until
from test_work_queue import assert_one_line_error

pytestmark = pytest.mark.queue_semantics  # ./run.sh test runs these on 4.0 too


def received_at(worker, task: str) -> float:
    return worker.times(rf"Received '{re.escape(task)}'")[0]


def ready_now(url: str, queue: str) -> int:
    """ready_count, or -1 while the broker does not answer yet (just after a restart)."""
    try:
        return ready_count(url, queue)
    except pika.exceptions.AMQPError:
        return -1


def test_a_delayed_task_waits_in_the_broker_and_starts_at_its_time(env, queue, start, broker):
    # 45 s: the checks below must end before the tasks are due, and took over 30 s beside two CPU hogs.
    worker = start_worker(start, queue)
    sent = time.monotonic()
    result = run_script("new_task.py", "--queue", queue, "--delay", "45", "Remind me.", env=env)
    assert result.returncode == 0, result.stderr
    assert "due in 45s (about " in result.stdout and f"waiting in {queue}.delay.45s" in result.stdout
    publish(env, queue, *[f"later {n}" for n in range(20)], extra=("--delay", "45"))  # a bulk publish, delayed
    # While they wait, no worker holds them: they are ready in the delay queue, and the worker has none.
    assert worker.count("Received") == 0 and ready_count(broker.url, f"{queue}.delay.45s") == 21
    assert broker.queue_counts(queue)[1] == 0  # rabbitmqctl, as a user would check: messages_unacknowledged
    assert time.monotonic() < sent + 45, "the checks took longer than the delay: they show nothing"
    worker.wait_for(r"Done 'later 19'", timeout=60)
    worker.wait_for(r"Done 'Remind me\.'", timeout=30)
    started = received_at(worker, "Remind me.")
    assert started >= sent + 45, "started before its time"
    lateness = float(re.search(r"Received 'Remind me\.' \(due [\d:]+, ([\d.]+)s late\)", worker.output)[1])
    assert lateness < 3.0, worker.output  # about a second at most on a quiet machine; this one may be busy
    assert worker.count("Received") == 21 and ready_count(broker.url, f"{queue}.delay.45s") == 0
    # The delay queue removes itself an hour after its last use (x-expires): many delays leave no queues behind.
    listed = broker.rabbitmqctl("list_queues", "name", "arguments", "--quiet", "--no-table-headers")
    line = next(line for line in listed.splitlines() if line.startswith(f"{queue}.delay.45s"))
    assert '{"x-expires",3645000}' in line.replace(" ", ""), line


def test_a_declaration_renews_a_classic_queue_s_x_expires_which_delay_queues_rely_on(broker, queue):
    """new_task.py declares its delay queue again while it publishes, so that it never expires with tasks
    in it; and once unused it goes away. (A quorum queue's lease is not renewed: delay queues are classic.)"""
    name = f"{queue}.delay.probe"
    arguments = {"x-queue-type": "classic", "x-expires": 2000}
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        channel = connection.channel()
        started = time.monotonic()
        while time.monotonic() < started + 4:  # twice its lease, declared every 0.5 s: still there
            channel.queue_declare(name, durable=True, arguments=arguments)
            connection.sleep(0.5)
        channel.queue_declare(name, passive=True)
        # Unused since: gone. (Each look is a declaration too, so look less often than its lease.)
        deadline = time.monotonic() + 30
        while queue_exists(connection, name):
            assert time.monotonic() < deadline, "a delay queue unused for longer than its x-expires is still there"
            connection.sleep(3)


def queue_exists(connection: pika.BlockingConnection, name: str) -> bool:
    try:
        with connection.channel() as channel:
            channel.queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False


def test_a_delayed_task_outlives_a_worker_kill_and_a_broker_restart_and_is_not_early(env, queue, start, running_broker):
    worker = start_worker(start, queue)  # 45 s: a restart takes 30 s and more on a loaded machine
    sent = time.monotonic()
    result = run_script("new_task.py", "--queue", queue, "--delay", "45", "Later.", env=env)
    assert result.returncode == 0, result.stderr
    worker.kill()  # kill -9 while it waits: it held nothing
    running_broker.restart()
    assert time.monotonic() < sent + 45, "the restart took longer than the delay: the test shows nothing"
    wait_until(lambda: ready_now(running_broker.url, f"{queue}.delay.45s") == 1, 15, "the waiting task")
    again = start_worker(start, queue, name="w2")
    again.wait_for(r"Done 'Later\.'", timeout=60)
    assert received_at(again, "Later.") >= sent + 45, "a restart made it early"
    assert again.count("Received") == 1 and worker.count("Received") == 0
    assert ready_count(running_broker.url, f"{queue}.delay.45s") == 0 and ready_count(running_broker.url, queue) == 0


def test_a_high_priority_task_overtakes_a_backlog_on_rabbitmq_4_and_is_refused_before(env, queue, start, broker):
    if rabbitmq_version(broker) < (4, 0):  # 3.10's quorum queues ignore priorities: nothing is sent
        refused = run_script("new_task.py", "--queue", queue, "--priority", "high", "urgent", env=env)
        assert_one_line_error(refused, 2, "ignore priorities", "nothing sent")
        assert ready_count(broker.url, queue) == 0
        return
    worker = start_worker(start, queue)  # prefetch 1
    publish(env, queue, "busy" + "." * 40)  # 4 s of work at DOT_SECONDS 0.1: the backlog builds behind it
    worker.wait_for(r"Received 'busy")
    backlog = [f"normal {n}" for n in range(6)]
    publish(env, queue, *backlog)
    publish(env, queue, "URGENT 1", "URGENT 2", extra=("--priority", "high"))
    assert worker.count(r"Done 'busy") == 0, "busy ended before the backlog was in: the test shows nothing"
    worker.wait_for(r"Done 'normal 5'", timeout=60)
    worker.wait_for(r"Done 'URGENT 2'", timeout=60)
    order = re.findall(r"Received '([^']*)'", worker.output)[1:]  # after busy
    assert order.index("URGENT 1") < 3 and order.index("URGENT 2") < 3, order  # served high:normal 2:1
    assert re.search(r"Received 'URGENT 1' \(high priority\)", worker.output)


def test_a_priority_nothing_would_read_is_refused_and_bad_times_too(env, queue):
    classic = run_script("new_task.py", "--queue", queue, "--queue-type", "classic", "--priority", "high", "x", env=env)
    assert_one_line_error(classic, 2, "x-max-priority", "nothing sent")
    past = run_script("new_task.py", "--queue", queue, "--at", "2020-01-01T00:00", "x", env=env)
    assert_one_line_error(past, 2, "that time has passed")
    too_far = run_script("new_task.py", "--queue", queue, "--at", "2099-01-01T00:00", "x", env=env)
    assert_one_line_error(too_far, 2, "more than 30 days")
    assert ready_count(env["AMQP_URL"], queue) == 0


def test_a_malformed_due_time_is_named_and_the_task_runs(env, queue, start, broker):
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.confirm_delivery()
        channel.basic_publish("", queue, b"odd", pika.BasicProperties(headers={"x-due-at": "soon"}, delivery_mode=2))
    worker = start_worker(start, queue)
    worker.wait_for(r"Done 'odd'")
    assert "ignoring header x-due-at='soon': not a time in milliseconds" in worker.output


RENEWS_EVERY_SECOND = """
import sys

sys.path.insert(0, {root!r})
import new_task, workqueue, workqueue.producer

workqueue.producer.RENEW_DELAY_QUEUE = 1.0  # instead of every 10 minutes
sys.argv[0] = "new_task.py"
workqueue.run(new_task.main)
"""


def test_a_delay_queue_changed_under_a_long_publish_is_a_queue_mismatch_not_a_refused_message(
    env, queue, start, broker, tmp_path
):
    """new_task.py declares its delay queue again before a publish once RENEW_DELAY_QUEUE has passed (its
    x-expires lease). If another
    version declared it with other arguments meanwhile, that declaration's 406 says so (exit 5), as the
    first one would; it is not a message the broker refused (exit 6)."""
    from conftest import ROOT  # noqa: PLC0415

    script = tmp_path / "renews_fast.py"
    script.write_text(RENEWS_EVERY_SECOND.format(root=str(ROOT)))
    producer = start(str(script), "--queue", queue, "--delay", "30", "--file", "-", stdin=subprocess.PIPE)
    producer.proc.stdin.write("first\n")
    producer.proc.stdin.flush()
    wait_until(lambda: ready_now(broker.url, f"{queue}.delay.30s") == 1, 30, "the first task waits")
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:  # another version's delay queue
        channel = connection.channel()
        channel.queue_delete(f"{queue}.delay.30s")
        channel.queue_declare(f"{queue}.delay.30s", durable=True, arguments={"x-message-ttl": 1000})
    time.sleep(1.5)  # (past the renewal period: the next line's publish declares the delay queue again)
    producer.proc.stdin.write("second\n")
    producer.proc.stdin.flush()
    assert producer.wait(timeout=30) == 5, producer.output
    assert f"queue '{queue}.delay.30s' already exists with other arguments" in producer.output
    assert "max_message_size" not in producer.output and "Traceback" not in producer.output
