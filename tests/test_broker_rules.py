"""The rules each RabbitMQ release applies to a task that comes back, and how the worker keeps to them:
delivery counts, RabbitMQ 4's delivery limit of 20, consumer timeouts, hand-backs at shutdown.

./run.sh test runs these on every supported release (3.10, 4.0, 4.3). Where a release has no such
rule (3.10 has no delivery limit), the same test checks that nothing is lost there either."""

from __future__ import annotations

import re
import signal
import time

import pika
import pytest
from conftest import get_all, publish, rabbitmq_version, run_script, start_worker, wait_for_counts, wait_until

pytestmark = pytest.mark.queue_semantics

LIMIT = 20  # RabbitMQ 4's default delivery limit on quorum queues
PAST_THE_LIMIT = LIMIT + 2


def take(channel, queue: str):
    """basic_get the one task of a queue, unacked (a return takes a moment to be ready again)."""
    method = None
    deadline = time.monotonic() + 10
    while method is None and time.monotonic() < deadline:
        method, _, _ = channel.basic_get(queue)
    assert method is not None, f"the task is gone from {queue}"
    return method


def take_and_die(broker, queue: str, times: int) -> None:
    """A consumer that takes the task and dies holding it (its connection closes, no ack), `times` times."""
    for _ in range(times):
        with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
            take(connection.channel(), queue)


def take_and_nack(broker, queue: str, times: int) -> None:
    """A consumer that takes the task and hands it back with basic.nack, `times` times."""
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        channel = connection.channel()
        for _ in range(times):
            channel.basic_nack(take(channel, queue).delivery_tag, requeue=True)


def returns_seen(headers: dict) -> int:
    """Every return of a message, as the broker counts it on delivery (4.3: x-acquired-count)."""
    return headers.get("x-acquired-count", headers.get("x-delivery-count", 0))


def one_dead_task(env, queue, start) -> None:
    """A task that failed its only attempt, in <queue>.dlq; the worker stopped."""
    worker = start_worker(start, queue, "--max-retries", "0")
    publish(env, queue, "error")
    worker.wait_for(r"Failed 'error': TaskFailed: the task says 'error'; moved to ")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


def test_listing_the_dead_letters_any_number_of_times_loses_none(env, queue, start, broker):
    """RabbitMQ 4.0 counts every nack of `list` toward the limit of 20: the dead-letter queue has none."""
    one_dead_task(env, queue, start)
    for run in range(1, PAST_THE_LIMIT + 1):
        listed = run_script("dead_letters.py", "list", "--queue", queue, env=env)
        assert listed.returncode == 0, listed.stderr
        assert "1 dead task in" in listed.stdout, f"run {run}:\n{listed.stdout}"
        assert listed.stderr == ""


def test_dead_tasks_outlive_readers_that_die_holding_them(env, queue, start, broker):
    """A reader that disconnects without acking counts on 4.0 and 4.3 alike (an interrupted replay, a peek)."""
    one_dead_task(env, queue, start)
    take_and_die(broker, queue + ".dlq", PAST_THE_LIMIT)
    listed = run_script("dead_letters.py", "list", "--queue", queue, env=env)
    assert "1 dead task in" in listed.stdout, listed.stdout + listed.stderr


def test_a_task_whose_workers_keep_dying_is_dead_lettered_whatever_max_retries(env, queue, start, broker):
    """20 deaths, then a worker with --max-retries 25: RabbitMQ 4 would drop the task at the next death."""
    publish(env, queue, "crash")  # kills the worker that runs it (--isolation thread)
    take_and_die(broker, queue, LIMIT)
    worker = start_worker(start, queue, "--max-retries", "25")
    worker.wait_for(r"Failed 'crash': it came back 20 times without an ack \(a worker died with it.*; moved to ")
    assert worker.count(r"Received 'crash'") == 0 and worker.proc.poll() is None
    wait_for_counts(broker, queue, 0, 0)
    ((body, headers),) = get_all(broker, queue + ".dlq")
    assert body == b"crash" and headers["x-error"].startswith("it came back 20 times without an ack")


def test_the_redelivery_label_counts_every_return(env, queue, start, broker):
    """4.3 no longer counts nacks in x-delivery-count; x-acquired-count counts every return."""
    publish(env, queue, "thrice")
    take_and_nack(broker, queue, 3)
    worker = start_worker(start, queue)
    worker.wait_for(r"Received 'thrice' \(redelivered 3 times\)")
    worker.wait_for(r"Done 'thrice'")


def test_headers_the_broker_set_are_not_copied_onto_retries_dead_letters_or_replays(env, queue, start, broker):
    publish(env, queue, "error")
    take_and_nack(broker, queue, 1)  # delivered with x-delivery-count (and, on 4.3, x-acquired-count)
    worker = start_worker(start, queue, "--max-retries", "2", "--retry-delays", "0.5")
    # It went through a wait queue, which gave it x-death headers on its way back.
    worker.wait_for(r"Failed 'error': TaskFailed: the task says 'error'; moved to ", timeout=30)
    broker_set = re.compile(r"x-acquired-count|x-death|x-first-death-|x-last-death-")

    def copied(headers: dict) -> list[str]:
        # 3.10 puts x-delivery-count 0 on every first delivery: a non-zero one was copied.
        return [k for k in headers if broker_set.match(k) or (k == "x-delivery-count" and headers[k])]

    ((body, headers),) = get_all(broker, queue + ".dlq")
    assert body == b"error" and headers["x-retries"] == 2
    assert copied(headers) == [], headers
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0

    one_dead_task(env, queue, start)
    take_and_nack(broker, queue + ".dlq", 2)
    replayed = run_script("dead_letters.py", "replay", "--queue", queue, env=env)
    assert replayed.returncode == 0, replayed.stderr
    ((body, headers),) = get_all(broker, queue)
    assert body == b"error" and copied(headers) == [], headers


def test_a_warm_shutdown_hands_each_held_task_back_once(env, queue, start, broker, gate):
    worker = start_worker(start, queue, "--prefetch", "2", *gate.task, cwd=gate.folder)
    publish(env, queue, "long", "held")  # 'long' runs until the gate opens (a 10 s task once ended first, under load)
    worker.wait_for(r"Received 'long")
    wait_for_counts(broker, queue, 0, 2)  # 'held' is at the worker, waiting for its thread
    worker.signal(signal.SIGTERM)
    worker.wait_for(r"Handed back 'held' untouched")
    gate.open()
    assert worker.wait() == 0
    wait_for_counts(broker, queue, 1, 0)
    ((body, headers),) = get_all(broker, queue)
    assert body == b"held" and returns_seen(headers) == 1, headers


def refuse_dead_letters(broker, queue: str) -> str:
    """From now on <queue>.dlq refuses every publish (until its policy, returned, is cleared and one of its
    messages, b"earlier", is taken): a quorum queue refuses a publish once it is past its max-length, 1 > 0."""
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", queue + ".dlq", b"earlier")
    policy = f"{queue}-full"
    broker.rabbitmqctl(
        "set_policy", policy, f"^{re.escape(queue)}\\.dlq$", '{"max-length": 0, "overflow": "reject-publish"}',
        "--apply-to", "queues",
    )  # fmt: skip
    return policy


def test_a_refused_dead_letter_publish_backs_off_and_loses_nothing(env, queue, start, broker):
    """A dead-letter queue that refuses (full, say) must not turn the worker into a hot loop."""
    worker = start_worker(start, queue, "--max-retries", "0")
    policy = refuse_dead_letters(broker, queue)
    try:
        publish(env, queue, "error")
        worker.wait_for(r"could not publish to \S+\.dlq \(the broker refused it\); trying again in")
        time.sleep(3)  # how often it tries in these 3 s is what the test is about
        tries = worker.count(r"could not publish to")
        assert tries <= 5, worker.output  # 0.25 + 0.5 + 1 + 2 s of pauses; a hot loop makes hundreds
        # Room again: a quorum queue lets publishes in once its length falls (a policy change alone is not enough).
        with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
            channel = connection.channel()
            _, _, body = channel.basic_get(queue + ".dlq", auto_ack=True)  # the head only: a retry may land
            assert body == b"earlier"
    finally:
        broker.rabbitmqctl("clear_policy", policy)
    worker.wait_for(r"Failed 'error': TaskFailed: the task says 'error'; moved to ", timeout=30)
    wait_for_counts(broker, queue, 0, 0)
    ((body, headers),) = get_all(broker, queue + ".dlq")
    assert body == b"error" and headers["x-error"] == "TaskFailed: the task says 'error'"
    assert worker.count(r"Received 'error'") == 1 and worker.proc.poll() is None


def test_a_failure_held_past_the_consumer_timeout_is_dead_lettered_once_and_blames_no_running_task(
    env, queue, start, broker, consumer_timeout_3s
):
    """The dead-letter queue refuses for longer than the consumer timeout: the broker takes the held failure
    back (4.3 cancels the consumer, older releases close the channel). It is the oldest task held, so no
    running task is blamed for it, and it ends in the dead-letter queue once, after it has run again."""
    worker = start_worker(start, queue, "--max-retries", "0", "--concurrency", "2", "--dot-seconds", "0.5")
    policy = refuse_dead_letters(broker, queue)
    try:
        publish(env, queue, "error")
        worker.wait_for(r"could not publish to \S+\.dlq \(the broker refused it\); trying again in")
        publish(env, queue, "beside..")  # 1 s, run beside the held failure, again and again as channels go
        worker.wait_for(r"consumer timeout|cancelled our consumer", timeout=60)
        worker.wait_for(r"Received 'error' \(redelivered", timeout=30)
        with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:  # room again (see above)
            assert connection.channel().basic_get(queue + ".dlq", auto_ack=True)[2] == b"earlier"
    finally:
        broker.rabbitmqctl("clear_policy", policy)
    worker.wait_for(r"Failed 'error': TaskFailed: the task says 'error'; moved to ", timeout=60)
    wait_for_counts(broker, queue, 0, 0)
    dead = get_all(broker, queue + ".dlq")
    assert [body for body, _ in dead] == [b"error"], worker.output
    assert "Done 'beside..'" in worker.output and worker.proc.poll() is None, worker.output
    assert "'beside..' for" not in worker.output, worker.output  # not blamed as the task held too long


@pytest.fixture
def consumer_timeout_3s(broker):
    """The broker takes a task back from a consumer that holds it unacked for 3 s (30 min by default)."""
    broker.rabbitmqctl("eval", "application:set_env(rabbit, consumer_timeout, 3000).")
    yield
    broker.rabbitmqctl("eval", "application:set_env(rabbit, consumer_timeout, 1800000).")


def test_a_consumer_timeout_is_named_and_leaves_nothing_held(env, queue, start, broker, consumer_timeout_3s):
    """4.3 cancels the consumer (it used to be misread as a deleted queue, then pika crashed); older
    releases close the channel. Either way: one clear line, a fresh channel, the task not lost."""
    worker = start_worker(start, queue, "--max-retries", "1", "--dot-seconds", "1")
    publish(env, queue, "slow......")  # 6 s: twice the timeout
    worker.wait_for(r"consumer timeout", timeout=30)
    worker.wait_for(r"moved to", timeout=60)  # it can never finish in time: taken back twice, then dead-lettered
    assert not re.search(r"connection lost|deleted|KeyError|Done", worker.output), worker.output
    assert worker.proc.poll() is None
    wait_for_counts(broker, queue, 0, 0)
    ((_, headers),) = get_all(broker, queue + ".dlq")
    assert headers["x-error"].startswith("the broker's consumer timeout took it back 2 times"), headers


@pytest.mark.parametrize("option", [("--consumer-timeout", "30"), ("--time-limit", "20")])
def test_consumer_timeout_option_holds_a_long_task_on_4_3(env, queue, start, broker, consumer_timeout_3s, option):
    """--consumer-timeout asks for x-consumer-timeout; --time-limit sets it to cover the tasks held."""
    worker = start_worker(start, queue, *option, "--dot-seconds", "1")
    publish(env, queue, "slow......")
    if rabbitmq_version(broker) >= (4, 3):  # x-consumer-timeout on basic.consume: the broker's setting yields to it
        worker.wait_for(r"Done 'slow\.+'", timeout=30)
        assert "consumer timeout" not in worker.output
        wait_for_counts(broker, queue, 0, 0)
    else:  # older releases ignore it: the broker's own setting applies, and the worker says so
        worker.wait_for(r"consumer timeout", timeout=30)


def test_a_dead_letter_queue_declared_before_keeps_working_and_says_how_to_lift_its_limit(env, queue, start, broker):
    """A <queue>.dlq that an earlier version declared (quorum, nothing else) has RabbitMQ 4's limit."""
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        connection.channel().queue_declare(queue + ".dlq", durable=True, arguments={"x-queue-type": "quorum"})
    worker = start_worker(start, queue, "--max-retries", "0")
    publish(env, queue, "error")
    worker.wait_for(r"Failed 'error': TaskFailed: the task says 'error'; moved to ")
    warning = [line for line in worker.lines if "x-delivery-limit" in line]
    if rabbitmq_version(broker) < (4, 0):
        assert warning == []  # 3.10 has no such limit
        return
    assert len(warning) == 1, worker.output
    policy = re.search(r"rabbitmqctl (set_policy \S+ '(.*?)' '(.*?)' --apply-to quorum_queues)", warning[0])
    assert policy, warning[0]
    name = policy[1].split()[1]
    broker.rabbitmqctl("set_policy", name, policy[2], policy[3], "--apply-to", "quorum_queues")

    def applied() -> bool:  # set_policy returns before the queue has it (seconds, under load): each list counts
        rows = broker.rabbitmqctl("list_queues", "name", "policy", "--quiet", "--no-table-headers").splitlines()
        return f"{queue}.dlq\t{name}" in rows

    wait_until(applied, 60, f"the policy {name} to apply to {queue}.dlq", every=0.5)
    listed = run_script("dead_letters.py", "list", "--queue", queue, env=env)
    assert "1 dead task in" in listed.stdout and "set_policy" in listed.stderr  # it warns too, in one line
    assert listed.stderr.count("\n") == 1, listed.stderr
    try:
        for _ in range(PAST_THE_LIMIT):  # what the warning's policy is for
            listed = run_script("dead_letters.py", "list", "--queue", queue, env=env)
            assert "1 dead task in" in listed.stdout, listed.stdout + listed.stderr
    finally:
        broker.rabbitmqctl("clear_policy", name)


def test_a_deleted_wait_queue_is_declared_again_and_the_retry_waits_there(env, queue, start, broker):
    worker = start_worker(start, queue, "--max-retries", "1", "--retry-delays", "1")
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        connection.channel().queue_delete(queue + ".retry.1s")  # under the running worker
    publish(env, queue, "error")
    worker.wait_for(r"could not publish to \S+\.retry\.1s \(no such queue\); trying again in 0.25s")
    worker.wait_for(r"Failed 'error': TaskFailed: the task says 'error'; retry 1 of 1 in 1s")
    worker.wait_for(r"Failed 'error': TaskFailed: the task says 'error'; moved to ", timeout=30)
    ((body, headers),) = get_all(broker, queue + ".dlq")
    assert body == b"error" and headers["x-retries"] == 1
