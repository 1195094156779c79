#!/usr/bin/env python
"""Take tasks from the work queue and do them, one at a time.

The default task sleeps one second per dot in the message (and fails when the
message contains the word "error"); --task runs a function of yours instead.

How it stays correct where the tutorial's worker is not:
- the task runs in a thread of its own, so pika keeps answering heartbeats
  during a long task; the ack goes back through add_callback_threadsafe
  (a task done within 5 ms is acked from on_message, which waits for it);
- a lost connection is reported and re-opened with capped backoff;
- a failed task is published again with its attempt count in a header, and
  after --max-retries it goes to the dead-letter queue <queue>.dlq;
- Ctrl+C (or SIGTERM) finishes the current task first; a second one quits now.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import importlib
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pika

import workqueue

LOGGER = logging.getLogger("worker")

QUICK_TASK_SECONDS = 0.005  # how long on_message waits for a task before it goes back to the connection

EXAMPLES = """\
examples:
  python worker.py                          # one second of work per dot
  python worker.py --name w1                # label this worker's lines
  python worker.py --prefetch 0             # no limit: plain round-robin
  python worker.py --auto-ack               # the tutorial's first worker: a crash loses tasks
  python worker.py --task mytasks:resize    # call mytasks.resize(body) for each task
  DOT_SECONDS=0.1 python worker.py --max-tasks 10
"""


def make_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Consume tasks from a durable RabbitMQ work queue, with manual acks.",
        epilog=EXAMPLES
        + "\n"
        + workqueue.EXIT_CODES_HELP
        + "  130/143  second Ctrl+C / SIGTERM: cold shutdown\n\n"
        + "kill -USR1 PID prints every thread's stack (is a task stuck?); the worker goes on.\n",
        formatter_class=workqueue.HelpFormatter,
    )
    parser.add_argument(
        "--name",
        default=f"w{os.getpid()}",
        help="label on every line this worker prints",
    )
    parser.add_argument(
        "--prefetch",
        type=non_negative(int),
        default=1,
        metavar="N",
        help="unacknowledged tasks the broker may give this worker at once (0 = no limit)",
    )
    parser.add_argument(
        "--auto-ack",
        action="store_true",
        help="let the broker forget each task as soon as it is delivered (a crash loses it)",
    )
    parser.add_argument(
        "--dot-seconds",
        type=non_negative(float),
        default=float(os.environ.get("DOT_SECONDS", "1")),
        metavar="S",
        help="seconds of work per dot in the default task (env DOT_SECONDS)",
    )
    parser.add_argument(
        "--task",
        metavar="MODULE:FUNCTION",
        help="call FUNCTION(body: bytes) from MODULE for each task; returning = done, raising = failed",
    )
    parser.add_argument(
        "--max-retries",
        type=non_negative(int),
        default=3,
        metavar="N",
        help="times a failed task is tried again before it goes to the dead-letter queue <queue>.dlq",
    )
    parser.add_argument("--max-tasks", type=non_negative(int), metavar="N", help="exit 0 after N tasks")
    parser.add_argument(
        "--connect-timeout",
        type=non_negative(float),
        default=30.0,
        metavar="S",
        help="seconds to keep trying to reach the broker at start (later losses: retried until stopped)",
    )
    workqueue.add_connection_arguments(parser)
    workqueue.add_queue_arguments(parser)
    return parser


def non_negative(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more: {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


# --- Tasks -----------------------------------------------------------------------


class TaskFailed(Exception):
    pass


def dot_task(seconds_per_dot: float) -> Callable[[bytes], None]:
    """The tutorial's fake work: one unit of time per dot; the word 'error' fails."""

    def sleep_per_dot(body: bytes) -> None:
        seconds = body.count(b".") * seconds_per_dot
        if seconds:  # even sleep(0) gives up the GIL: skip it for empty tasks
            time.sleep(seconds)
        if re.search(rb"\berror\b", body, re.IGNORECASE):
            raise TaskFailed("the task says 'error'")

    return sleep_per_dot


def load_task(spec: str) -> Callable[[bytes], object]:
    """MODULE:FUNCTION, importable from the current directory or PYTHONPATH."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise workqueue.UsageError(f"--task wants MODULE:FUNCTION, not {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise workqueue.UsageError(f"--task {spec}: cannot import {module_name}: {error}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise workqueue.UsageError(f"--task {spec}: {module_name} has no function {function_name}")
    return function


# --- The worker ------------------------------------------------------------------


@dataclass
class Delivery:
    """One task as it came from the broker, and the connection and channel that must ack it."""

    connection: pika.BlockingConnection
    channel: pika.adapters.blocking_connection.BlockingChannel
    delivery_tag: int
    body: bytes
    properties: pika.BasicProperties
    redelivered: bool

    @property
    def retries(self) -> int:
        return int((self.properties.headers or {}).get("x-retries", 0))

    @property
    def text(self) -> str:
        text = self.body.decode("utf-8", errors="replace")
        return text if len(text) <= 50 else text[:49] + "…"


Result = tuple[Delivery, str, Exception | None, float]  # the delivery, "done"/"failed"/"requeue", error, seconds


class Worker:
    def __init__(self, args: argparse.Namespace, task: Callable[[bytes], object]):
        self.args = args
        self.task = task
        self.dead_letter_queue = workqueue.dead_letter_queue(args.queue)
        self.stopping = False  # set by the first signal, or after --max-tasks
        self.signalled = False
        self.tasks_done = 0
        self.output_lock = threading.Lock()

        # The task thread takes deliveries from `todo`, and puts what happened in
        # `results`; only the connection's thread (this one) talks to the broker.
        self.todo: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self.current: Delivery | None = None
        self.taking_tasks = True
        self.handoff = threading.Lock()
        self.waiting_in_callback = False  # on_message waits for a short task: no need to wake the loop
        threading.Thread(target=self.run_tasks, name="task", daemon=True).start()

    def say(self, line: str) -> None:
        with self.output_lock:
            sys.stdout.write(f"{self.args.name} {line}\n")
            sys.stdout.flush()

    # Connection: connect, consume, and reconnect after every loss.

    def run(self) -> int:
        urls = workqueue.broker_urls(self.args.url)
        retry_for = self.args.connect_timeout
        while not self.stopping:
            connection = workqueue.connect(urls, retry_for, should_stop=lambda: self.stopping)
            if connection is None:
                break
            retry_for = None  # once connected, a later loss is retried until we are stopped
            try:
                self.consume(connection)
                connection.close()
            except pika.exceptions.AMQPError as error:
                if not workqueue.is_connection_lost(error):
                    raise
                busy = " (the task in progress will be redelivered)" if self.current else ""
                LOGGER.warning("connection lost: %s; reconnecting%s", workqueue.describe(error), busy)
                if connection.is_open:
                    connection.close()
        self.wait_for_current_task()
        return workqueue.EXIT_OK

    def consume(self, connection: pika.BlockingConnection) -> None:
        """Declare the queues and take tasks until told to stop."""
        channel = connection.channel()
        channel.basic_qos(prefetch_count=self.args.prefetch)  # at most N unacked tasks at this worker
        channel.confirm_delivery()  # our retry and dead-letter publishes wait for the broker's OK
        self.handle_results()  # tasks finished while we were disconnected: report their lost acks
        self.check_for_stop(channel)
        while True:
            for name in (self.args.queue, self.dead_letter_queue):
                channel.queue_declare(
                    queue=name, durable=True, arguments=workqueue.queue_arguments(self.args.queue_type)
                )
            channel.basic_consume(
                queue=self.args.queue,
                on_message_callback=functools.partial(self.on_message, connection),
                auto_ack=self.args.auto_ack,
            )
            self.say("[*] Waiting for messages. To exit press CTRL+C")
            channel.start_consuming()  # until stop_consuming(), or the broker cancels our consumer
            if self.stopping:
                break
            LOGGER.warning(
                "the broker cancelled our consumer (was queue '%s' deleted?): declaring it again", self.args.queue
            )
        while self.current or not self.todo.empty() or not self.results.empty():
            connection.process_data_events(time_limit=0.25)  # the current task's ack goes out here
            self.handle_results()

    def check_for_stop(self, channel) -> None:
        """Every 0.2 s, in the connection's thread: act on a signal (its handler only sets a flag)."""
        if self.stopping:
            self.stop_taking_tasks(channel)
        else:
            channel.connection.call_later(0.2, functools.partial(self.check_for_stop, channel))

    def stop_taking_tasks(self, channel) -> None:
        """Cancel the consumer, give back the tasks not started; the current one still gets finished."""
        self.stopping = True
        if self.current and self.signalled:
            self.say(f"[*] Finishing '{self.current.text}' first (press CTRL+C again to quit now)")
        if channel.consumer_tags:
            channel.stop_consuming()  # pika also requeues deliveries it has not handed to us yet
        if not self.args.auto_ack:  # auto-acked tasks are ours alone: do them rather than lose them
            with self.handoff:
                self.taking_tasks = False
                while not self.todo.empty():
                    channel.basic_nack(self.todo.get().delivery_tag, requeue=True)

    def wait_for_current_task(self) -> None:
        """After a lost connection the task still runs: let it end (its ack is lost anyway)."""
        while self.current:
            time.sleep(0.1)
        while not self.results.empty():
            self.report_lost_ack(self.results.get()[0])

    def on_message(self, connection, channel, method, properties, body) -> None:
        """A task arrived: hand it to the task thread, and give it a moment to finish.

        Most tasks of a work queue are short: when this one ends within QUICK_TASK_SECONDS, its ack
        goes out from here at once, and the connection's loop need not be woken from the task thread.
        """
        with self.handoff:
            self.waiting_in_callback = True
        self.todo.put(Delivery(connection, channel, method.delivery_tag, body, properties, method.redelivered))
        try:
            finished = self.results.get(timeout=QUICK_TASK_SECONDS)
        except queue.Empty:
            finished = None
        with self.handoff:
            self.waiting_in_callback = False
        if finished:
            self.handle_result(*finished)
        self.handle_results()

    # The task thread.

    def run_tasks(self) -> None:
        while True:
            delivery = self.todo.get()
            with self.handoff:
                if not self.taking_tasks:
                    self.results.put((delivery, "requeue", None, 0.0))
                    continue
                self.current = delivery
            attempt = f" (attempt {delivery.retries + 1} of {self.args.max_retries + 1})" if delivery.retries else ""
            again = " (redelivered)" if delivery.redelivered else ""
            self.say(f"[x] Received '{delivery.text}'{attempt}{again}")
            started = time.monotonic()
            try:
                self.task(delivery.body)
                error = None
            except Exception as failure:
                error = failure
            with self.handoff:
                self.results.put((delivery, "failed" if error else "done", error, time.monotonic() - started))
                self.current = None
                if self.waiting_in_callback:
                    continue  # on_message is waiting, and handles the result itself
            try:
                # The only thread-safe call on a connection: run handle_results in its thread, now.
                delivery.connection.add_callback_threadsafe(self.handle_results)
            except pika.exceptions.ConnectionWrongStateError:
                pass  # connection gone: the main loop reports it

    # Back in the connection's thread: ack, retry or dead-letter.

    def handle_results(self) -> None:
        while not self.results.empty():
            self.handle_result(*self.results.get())

    def handle_result(self, delivery: Delivery, outcome: str, error: Exception | None, seconds: float) -> None:
        if not delivery.channel.is_open:
            self.report_lost_ack(delivery)
        elif outcome == "requeue":
            delivery.channel.basic_nack(delivery.delivery_tag, requeue=True)
        elif self.args.auto_ack:
            self.say(
                f"[x] Done '{delivery.text}' in {seconds:.1f}s"
                if not error
                else f"[!] Failed '{delivery.text}': {error} (auto-ack: the task is lost)"
            )
            self.count_task(delivery.channel)
        elif error is None:
            delivery.channel.basic_ack(delivery.delivery_tag)
            self.say(f"[x] Done '{delivery.text}' in {seconds:.1f}s")
            self.count_task(delivery.channel)
        else:
            self.retry_or_dead_letter(delivery, error)
            self.count_task(delivery.channel)

    def retry_or_dead_letter(self, delivery: Delivery, error: Exception) -> None:
        """Publish the failed task again (to the back of the queue) or to the DLQ, confirmed, then ack it."""
        reason = f"{type(error).__name__}: {error}"[:200]
        headers = dict(delivery.properties.headers or {})
        if delivery.retries < self.args.max_retries:
            headers["x-retries"] = delivery.retries + 1
            target, what = (
                self.args.queue,
                f"retry {delivery.retries + 1} of {self.args.max_retries}",
            )
        else:
            headers.update({"x-error": reason, "x-original-queue": self.args.queue})
            target, what = self.dead_letter_queue, f"moved to {self.dead_letter_queue}"
        properties = pika.BasicProperties(
            delivery_mode=delivery.properties.delivery_mode or pika.DeliveryMode.Persistent,
            headers=headers,
        )
        try:
            delivery.channel.basic_publish(
                exchange="",
                routing_key=target,
                body=delivery.body,
                properties=properties,
                mandatory=True,
            )
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError):
            delivery.channel.basic_nack(delivery.delivery_tag, requeue=True)
            self.say(f"[!] Failed '{delivery.text}': {reason}; could not publish to {target}, requeued")
            return
        delivery.channel.basic_ack(delivery.delivery_tag)
        self.say(f"[!] Failed '{delivery.text}': {reason}; {what}")

    def report_lost_ack(self, delivery: Delivery) -> None:
        self.say(f"[!] Could not ack '{delivery.text}': its connection is gone; the broker will redeliver it")

    def count_task(self, channel) -> None:
        self.tasks_done += 1
        if self.args.max_tasks is not None and self.tasks_done >= self.args.max_tasks and not self.stopping:
            self.stop_taking_tasks(channel)  # now, before the broker's next delivery is started

    # Signals: the first asks for a warm shutdown, the second quits at once.

    def on_signal(self, signum, _frame) -> None:
        if self.signalled:
            os.write(
                2,
                f"{self.args.name} [!] Cold shutdown: exiting now; unacked tasks are requeued\n".encode(),
            )
            os._exit(128 + signum)
        self.stopping = self.signalled = True
        os.write(1, f"{self.args.name} [*] Warm shutdown: taking no new tasks\n".encode())


def main() -> int:
    args = make_argument_parser().parse_args()
    workqueue.setup_logging(args.name)
    for url in workqueue.broker_urls(args.url):
        workqueue.connection_parameters(url)  # a bad URL is a usage error, before connecting
    task = load_task(args.task) if args.task else dot_task(args.dot_seconds)
    if args.auto_ack:
        LOGGER.warning("auto-ack: the broker forgets each task when it is delivered; a crash loses it")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 PID: where is each thread stuck?
    worker = Worker(args, task)
    signal.signal(signal.SIGINT, worker.on_signal)
    signal.signal(signal.SIGTERM, worker.on_signal)
    return worker.run()


if __name__ == "__main__":
    workqueue.run(main)
