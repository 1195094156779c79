"""workqueue.Producer and AsyncProducer, the library API for applications, on a real broker: many threads
through one Producer and asyncio while the broker restarts, delay and priority, and the errors a program
gets when the broker cannot be reached or refuses the login."""

from __future__ import annotations

import asyncio
import importlib
import re
import sys
import threading
import time
from collections import Counter

import pika
import pytest
from conftest import ROOT, rabbitmq_version, ready_count, run_script, take_all, wait_until

import workqueue
from local_broker import free_port
from workqueue import AsyncProducer, Producer

pytestmark = pytest.mark.queue_semantics  # ./run.sh test runs these on 4.0 too


def assert_each_task_arrived_with_its_id(url: str, queue: str, sent: dict[bytes, str]) -> None:
    """Every task sent is in the queue, with the id send() returned; a copy sent again after a connection
    drop (its confirm lost) carries the same id, so that a worker can tell."""
    taken = take_all(url, queue)
    assert {body for body, _ in taken} == set(sent), "a task is missing, or one nobody sent is there"
    for body, properties in taken:
        assert properties.message_id == sent[body], body
        assert properties.delivery_mode == 2  # persistent
    copies = Counter(body for body, _ in taken)
    assert sum(copies.values()) - len(copies) <= 100, "more copies than a drop can leave unconfirmed"


def test_sixteen_threads_share_one_producer_through_a_broker_restart(queue, running_broker):
    per_thread, threads = 20, 16
    sent: dict[bytes, str] = {}  # body -> id; dict assignment is atomic
    errors: list[BaseException] = []
    confirmed = threading.Semaphore(0)
    with Producer(running_broker.url, queue, timeout=90) as producer:

        def sender(number: int) -> None:
            try:
                for i in range(per_thread):
                    body = f"thread {number} task {i}".encode()
                    sent[body] = producer.send(body)
                    confirmed.release()
                    time.sleep(0.02)  # a request handler's pace: the restart comes while they send
            except BaseException as error:  # the test fails with it below
                errors.append(error)

        workers = [threading.Thread(target=sender, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for _ in range(3 * threads):  # some confirmed before the restart, most sent during and after it
            assert confirmed.acquire(timeout=30), "no confirm within 30 s"
        running_broker.restart()
        for worker in workers:
            worker.join(timeout=120)
        assert not any(worker.is_alive() for worker in workers), "a sender still waits"
    assert not errors, errors
    assert len(sent) == per_thread * threads and len(set(sent.values())) == len(sent)  # an id each, unique
    assert_each_task_arrived_with_its_id(running_broker.url, queue, sent)


def test_the_asyncio_producer_rides_out_a_broker_restart_without_blocking_the_loop(queue, running_broker):
    async def main() -> tuple[dict[bytes, str], int]:
        ticks = 0

        async def ticker() -> None:  # counts while the loop is free
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        sent: dict[bytes, str] = {}
        async with AsyncProducer(running_broker.url, queue, timeout=90) as producer:
            clock = asyncio.create_task(ticker())
            for i in range(20):
                sent[f"before {i}".encode()] = await producer.send(f"before {i}")
            restart = asyncio.get_running_loop().run_in_executor(None, running_broker.restart)
            bodies = [f"during {i}".encode() for i in range(100)]
            ticks_before = ticks
            ids = await asyncio.gather(*(producer.send(body) for body in bodies))
            sent.update(zip(bodies, ids))
            await restart
            ids = await producer.send_many([f"after {i}" for i in range(200)])
            sent.update(zip((f"after {i}".encode() for i in range(200)), ids))
            clock.cancel()
        return sent, ticks - ticks_before

    sent, ticks = asyncio.run(main())
    assert len(sent) == 320 and len(set(sent.values())) == 320
    # A broker restart takes seconds; an event loop blocked by the sends would not have ticked meanwhile.
    assert ticks >= 20, ticks
    assert_each_task_arrived_with_its_id(running_broker.url, queue, sent)


def test_delay_and_priority_work_as_on_the_command_line(queue, broker):
    with Producer(broker.url, queue, timeout=30) as producer:
        task_id = producer.send(b"Remind me.", delay=3)
        waiting = f"{queue}.delay.3s"
        assert ready_count(broker.url, waiting) == 1 and ready_count(broker.url, queue) == 0
        wait_until(lambda: ready_count(broker.url, queue) == 1, 30, "the delayed task to move to the queue")
        [(body, properties)] = take_all(broker.url, queue)
        assert body == b"Remind me." and properties.message_id == task_id
        assert abs(properties.headers["x-due-at"] / 1000 - time.time()) < 10  # when it was due: just now

        if rabbitmq_version(broker) < (4, 0):  # 3.10's quorum queues ignore priorities: refused, nothing sent
            with pytest.raises(workqueue.UsageError, match="ignore priorities"):
                producer.send("urgent", priority="high")
            assert ready_count(broker.url, queue) == 0
            return
        producer.send_many([f"normal {n}" for n in range(4)])
        urgent = producer.send("URGENT", priority="high")
    taken = take_all(broker.url, queue)
    assert taken[0][0] == b"URGENT" and taken[0][1].message_id == urgent and taken[0][1].priority == 9


def test_a_classic_queue_refuses_a_priority_and_bad_arguments_raise_before_anything_is_sent(queue, broker):
    with Producer(broker.url, queue, queue_type="classic", timeout=30) as producer:
        with pytest.raises(ValueError, match="classic queue"):
            producer.send("x", priority="high")
        with pytest.raises(ValueError, match="delay"):
            producer.send("x", delay=-1)
    assert ready_count(broker.url, queue) == 0


def test_a_wrong_password_raises_login_refused_at_once_and_never_shows_the_password(queue, broker):
    url = broker.url.replace("guest:guest@", "guest:not-the-Secret@")
    assert url != broker.url
    started = time.monotonic()
    with Producer(url, queue, timeout=10) as producer, pytest.raises(workqueue.LoginRefused) as refused:
        producer.send("x")
    assert time.monotonic() - started < 10
    assert "login refused" in str(refused.value) and "not-the-Secret" not in str(refused.value)
    assert isinstance(refused.value, workqueue.WorkQueueError)


def test_an_unreachable_broker_raises_within_the_timeout_with_why(queue):
    port = free_port()
    started = time.monotonic()
    with Producer(f"amqp://guest:Secret@127.0.0.1:{port}/", queue, timeout=2) as producer:
        with pytest.raises(workqueue.BrokerUnreachable) as unreachable:
            producer.send("x")
        waited = time.monotonic() - started
        assert 2 <= waited < 4, waited
        closing = time.monotonic()
    assert time.monotonic() - closing < 2, "close() waited for a broker with nothing to send"
    text = str(unreachable.value)
    assert f"cannot reach 127.0.0.1:{port}" in text and "not sent" in text and "Secret" not in text

    async def many() -> None:
        async with AsyncProducer(f"amqp://guest:Secret@127.0.0.1:{port}/", queue, timeout=2) as producer:
            await producer.send_many(["a", "b"])

    with pytest.raises(workqueue.BrokerUnreachable, match=f"cannot reach 127.0.0.1:{port}") as unreachable:
        asyncio.run(many())
    assert unreachable.value.task_ids == [] and "Secret" not in str(unreachable.value)


def test_a_password_with_a_raw_comma_is_refused_without_showing_any_of_it():
    with pytest.raises(workqueue.UsageError, match="not a URL after a comma") as refused:
        Producer("amqp://guest:Zq,Xw9@localhost/")
    assert "Xw9" not in str(refused.value) and "Zq" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    ["guest:Secret@localhost", "localhost:5672", "amqp:guest:Secret@h", "amqp:/guest:Secret@h", "amqp:///u:Secret@h"],
)
def test_a_url_without_a_scheme_or_a_host_is_refused_without_showing_it(url, monkeypatch):
    monkeypatch.setenv("AMQP_URL", url)
    with pytest.raises(workqueue.UsageError, match=r"^(not an AMQP URL|bad URL:) .*expected amqp://") as refused:
        workqueue.connection_parameters(workqueue.broker_urls(None)[0])
    assert "Secret" not in str(refused.value)


def test_a_long_bulk_send_keeps_the_order_and_gives_every_task_its_id(queue, broker):
    count = 5000
    with Producer(broker.url, queue, timeout=60) as producer:
        ids = producer.send_many(f"task {n}" for n in range(count))
    assert len(ids) == count and len(set(ids)) == count
    taken = take_all(broker.url, queue)
    assert [body for body, _ in taken] == [f"task {n}".encode() for n in range(count)]
    assert [properties.message_id for _, properties in taken] == ids


def readme_example(first_line: str) -> str:
    """The python example of docs/production.md that starts with `first_line`."""
    examples = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "production.md").read_text(), re.DOTALL)
    [example] = [code for code in examples if code.startswith(first_line)]
    return example


@pytest.fixture
def default_queue(broker):
    """The examples send to task_queue: empty before, and gone after (with its delay queue)."""

    def remove() -> None:
        with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
            channel = connection.channel()
            for name in ("task_queue", "task_queue.delay.600s"):
                channel.queue_delete(name)

    remove()
    yield "task_queue"
    remove()


def test_the_readmes_web_example_answers_with_the_tasks_id_and_503_without_a_broker(
    default_queue, broker, tmp_path, monkeypatch
):
    pytest.importorskip("flask", reason="requirements-dev.txt installs it")
    (tmp_path / "app.py").write_text(readme_example("# app.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("AMQP_URL", broker.url)
    app = importlib.import_module("app")
    try:
        answer = app.app.test_client().post("/thumbnails", data=b"photo.jpg..")
        assert answer.status_code == 202, answer.get_data(as_text=True)
        [(body, properties)] = take_all(broker.url, default_queue)
        assert body == b"photo.jpg.." and properties.message_id == answer.get_json()["task"]
    finally:
        app.producer.close()
        sys.modules.pop("app", None)

    monkeypatch.setenv("AMQP_URL", f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    app = importlib.import_module("app")
    try:
        answer = app.app.test_client().post("/thumbnails", data=b"photo.jpg..")
        assert answer.status_code == 503 and "cannot reach 127.0.0.1" in answer.get_json()["error"]
    finally:
        app.producer.close(timeout=0)
        sys.modules.pop("app", None)


def test_the_readmes_asyncio_example_sends_what_it_says(default_queue, broker, env, tmp_path):
    (tmp_path / "send_async.py").write_text(readme_example("# send_async.py"))
    installed = {**env, "PYTHONPATH": str(ROOT)}  # as `pip install .` would have it
    result = run_script(str(tmp_path / "send_async.py"), env=installed)
    assert result.returncode == 0, result.stderr
    first, later, count = result.stdout.split()
    assert count == "100" and first != later
    now = take_all(broker.url, default_queue)
    assert [body for body, _ in now] == [b"Resize photo.jpg..", *(f"Thumbnail {n}.".encode() for n in range(100))]
    assert now[0][1].message_id == first
    [(body, properties)] = take_all(broker.url, "task_queue.delay.600s")
    assert body == b"Send the reminder." and properties.message_id == later
