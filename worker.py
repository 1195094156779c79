#!/usr/bin/env python
"""Take tasks from the work queue and do them: one at a time, or --concurrency N at once.

The default task sleeps one second per dot in the message; it fails on the word
"error", hangs on "hang" and kills its own process on "crash", so that every
fault can be tried. --task runs a function of yours instead.

How it stays correct where the tutorial's worker is not:
- tasks run in a pool of threads, so pika keeps answering heartbeats during a
  long task; only the connection's thread talks to the broker, and a delivery is
  acked on the channel it came on or not at all;
- a lost connection is reported and re-opened with capped backoff; deliveries of
  the dead channel that had not started are dropped (the broker redelivers them);
- a failed task waits in a wait queue (--retry-delays) and comes back with its
  attempt count in a header; after --max-retries it goes to the dead-letter
  queue <queue>.dlq; so does a task whose workers died running it again and again;
- --time-limit runs tasks in child processes, killed and replaced at the limit;
- Ctrl+C (or SIGTERM) starts no new task and finishes the running ones; a second
  one quits at once.
"""

from __future__ import annotations

import argparse
import copy
import enum
import faulthandler
import functools
import hashlib
import importlib
import logging
import multiprocessing
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import NamedTuple

import pika
from pika.adapters.blocking_connection import BlockingChannel

import policy
import workqueue
from metrics import Metrics, NoMetrics

LOGGER = logging.getLogger("worker")

QUICK_TASK_SECONDS = 0.005  # how long on_message waits for a lone task before going back to the connection
STEADY_SECONDS = 10.0  # a connection that lived this long resets the reconnect backoff
CHILD_START_SECONDS = 60.0  # a child process (--isolation process) must be ready to take tasks by then

EXAMPLES = """\
examples:
  python worker.py                          # one second of work per dot
  python worker.py --name w1                # label this worker's lines
  python worker.py --concurrency 8          # up to 8 tasks at once (I/O-bound tasks)
  python worker.py --time-limit 300         # stop a task after 5 minutes (it runs in a child process)
  python worker.py --retry-delays 5,60      # retry a failed task after 5 s, then every 60 s
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
        "--concurrency",
        type=workqueue.number(int, minimum=1),
        default=1,
        metavar="N",
        help="tasks run at once, each in a thread of its own; lines then name the thread: w1/2",
    )
    parser.add_argument(
        "--prefetch",
        type=workqueue.non_negative(int),
        metavar="N",
        help="unacknowledged tasks the broker may give this worker at once; 0 = no limit "
        "(default: the --concurrency value)",
    )
    parser.add_argument(
        "--auto-ack",
        action="store_true",
        help="let the broker forget each task as soon as it is delivered (a crash loses it)",
    )
    parser.add_argument(
        "--dot-seconds",
        type=workqueue.non_negative(float),
        default=os.environ.get("DOT_SECONDS", "1"),  # argparse checks a string default with `type` too
        metavar="S",
        help="seconds of work per dot in the default task (env DOT_SECONDS; 1 if unset)",
    )
    parser.add_argument(
        "--task",
        metavar="MODULE:FUNCTION",
        help="call FUNCTION(body: bytes) from MODULE for each task; returning = done, raising = failed",
    )
    parser.add_argument(
        "--max-retries",
        type=workqueue.non_negative(int),
        default=3,
        metavar="N",
        help="times a failed task is tried again before it goes to the dead-letter queue <queue>.dlq",
    )
    parser.add_argument(
        "--retry-delays",
        type=delays,
        default=policy.DEFAULT_RETRY_DELAYS,
        metavar="LIST",
        help="seconds a failed task waits before retry 1, 2, ...; the last repeats; 0 = at once. Each delay has a "
        "wait queue, <queue>.retry.<delay>s; one no longer used stays: remove it with "
        "python delete_queue.py task_queue.retry.60s --if-empty",
    )
    parser.add_argument(
        "--time-limit",
        type=workqueue.number(float, minimum=0.001),
        metavar="S",
        help="a task still running after S seconds is stopped and counts as failed (implies --isolation process)",
    )
    parser.add_argument(
        "--isolation",
        choices=("thread", "process"),
        help="run each task in a thread of the worker (the default: cheapest), or in a child process that "
        "can be killed and replaced (the default with --time-limit)",
    )
    parser.add_argument(
        "--consumer-timeout",
        type=workqueue.number(float, minimum=1),
        metavar="S",
        help="ask the broker to let this worker hold a task unacked for S seconds before it takes the task "
        "back (RabbitMQ 4.3 takes it; older brokers apply their consumer_timeout, 30 min by default); "
        "default with --time-limit: enough for every task it may hold",
    )
    parser.add_argument(
        "--max-tasks",
        type=workqueue.non_negative(int),
        metavar="N",
        help="start exactly N tasks, finish them, and exit 0",
    )
    parser.add_argument(
        "--connect-timeout",
        type=workqueue.non_negative(float),
        default=30.0,
        metavar="S",
        help="seconds to keep trying to reach the broker at start (later losses: retried until stopped)",
    )
    parser.add_argument(
        "--metrics-port",
        type=workqueue.number(int, minimum=1),
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics and a health check at /healthz",
    )
    parser.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST", help="address for --metrics-port")
    workqueue.add_connection_arguments(parser)
    workqueue.add_queue_arguments(parser)
    return parser


def delays(text: str) -> list[float]:
    """--retry-delays: comma-separated seconds, each 0 or more."""
    parse = workqueue.non_negative(float)
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"want seconds separated by commas, like 1,10,60: {text!r}")
    return [parse(part) for part in parts]


# --- Tasks -----------------------------------------------------------------------


class TaskFailed(Exception):
    pass


def dot_task(seconds_per_dot: float) -> Callable[[bytes], None]:
    """The tutorial's fake work: one unit of time per dot. To try the faults: the word 'error'
    fails, 'hang' never returns (try --time-limit), 'crash' kills the process running it."""

    def sleep_per_dot(body: bytes) -> None:
        seconds = body.count(b".") * seconds_per_dot
        if seconds:  # even sleep(0) gives up the GIL: skip it for empty tasks
            time.sleep(seconds)
        if re.search(rb"\bhang\b", body, re.IGNORECASE):
            time.sleep(10**6)  # blocked where no exception can reach it
        if re.search(rb"\bcrash\b", body, re.IGNORECASE):
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
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


# --- One delivery, and what became of it ---------------------------------------------


class TaskState(enum.Enum):
    WAITING = "waiting for a task thread"
    RUNNING = "running"
    DROPPED = "dropped: its channel died, or a warm shutdown gave it back"


@dataclass(eq=False)  # compared and hashed by identity: each delivery is one of a kind
class Delivery:
    """One task as it came from the broker, bound to the channel that must ack it."""

    channel: BlockingChannel
    delivery_tag: int
    body: bytes
    properties: pika.BasicProperties
    redelivered: bool
    retries: int  # failed attempts so far, from our x-retries header
    returns: Returns  # how often it came back unsettled before (quorum queues only)
    state: TaskState = TaskState.WAITING  # see TaskPool
    taken_back: bool = False  # by the broker's consumer timeout: not ours to ack (Worker.leave_channel)
    received: float = field(default_factory=time.monotonic)  # when it came (time.monotonic())

    @property
    def label(self) -> str:
        return workqueue.printable(self.body, limit=50)

    @property
    def identity(self) -> str:
        """The same for each delivery of one message (body and the ids a producer sets), to know it again."""
        ids = (self.properties.message_id, self.properties.correlation_id, self.properties.timestamp)
        return hashlib.sha256(repr(ids).encode() + self.body).hexdigest()


def retries_of(properties: pika.BasicProperties) -> tuple[int, str | None]:
    """(retries so far, a complaint if the x-retries header is not a count): any client can set it."""
    value = (properties.headers or {}).get("x-retries", 0)
    if is_count(value):
        return value, None
    return 0, f"ignoring header x-retries={value!r}: not a count of retries"


class Returns(NamedTuple):
    """How often a quorum queue got this message back unsettled, from the headers it adds (classic queues: 0, 0).

    RabbitMQ's versions count differently (the README has the table):
    - 3.10 and 4.0: x-delivery-count counts every return: a consumer that died or lost its
      connection or channel, a nack, a reject.
    - 4.3: x-delivery-count counts deaths and rejects, not nacks; x-acquired-count counts every return.
    On RabbitMQ 4 a quorum queue drops (or dead-letters) a message whose x-delivery-count would pass
    20: `counted` is the figure that limit looks at, `every` the one a person wants to see."""

    counted: int = 0  # toward the broker's delivery limit
    every: int = 0  # every return, nacks included


def returns_of(properties: pika.BasicProperties) -> Returns:
    headers = properties.headers or {}
    counted = headers.get("x-delivery-count", 0)
    counted = counted if is_count(counted) else 0
    every = headers.get("x-acquired-count", counted)  # absent before 4.3: x-delivery-count counts every return
    return Returns(counted, every if is_count(every) else counted)


def is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Outcome(enum.Enum):
    DONE = "done"
    FAILED = "failed"
    NOT_STARTED = "not started"  # a warm shutdown began before a thread took it: it goes back


class Result(NamedTuple):
    outcome: Outcome
    why: str | None = None  # why it failed
    seconds: float = 0.0
    thread: int = 0  # which of the --concurrency threads ran it (1..N)


class Console:
    """Lines on stdout, one per event, whole even when several threads print at once."""

    def __init__(self, name: str, show_threads: bool):
        self.name = name
        self.show_threads = show_threads
        self.lock = threading.Lock()

    def say(self, line: str, thread: int = 0) -> None:
        label = f"{self.name}/{thread}" if self.show_threads and thread else self.name
        text = workqueue.printable(f"{label} {line}") + "\n"  # a body's escape sequences stay inert
        with self.lock:
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except (OSError, ValueError):  # stdout went away (a closed pipe): work on without it
                pass


# --- The task side: threads that run tasks and never touch the broker ----------------------


class TaskPool:
    """Runs tasks in N threads of its own; each task's Result goes into `finished`.

    A thread runs its task itself (--isolation thread) or hands it to a child process of its own
    (--isolation process), which it kills and replaces when the task overruns --time-limit.

    Shared with the connection's thread, and why no race can hurt:
    - `todo` and `finished` are SimpleQueues (thread-safe): the connection's thread puts
      deliveries into `todo`, task threads take them; task threads put (delivery, result) into
      `finished`, and only the connection's thread takes from it.
    - `Delivery.state` changes only under `state_lock`: WAITING -> RUNNING by the task thread that
      takes it, or WAITING -> DROPPED by the connection's thread (drop()); never both.
    - `awaited`, the delivery whose result the connection's thread is waiting for in on_message
      (so its task thread need not wake it), is read and written under `state_lock` too.
    - `no_new_tasks`, an Event that the first signal sets: from then on no task starts. Its set()
      takes a lock that nothing else ever holds, so it is safe in a signal handler.
    """

    def __init__(self, args: argparse.Namespace, task: Callable[[bytes], object], console: Console, metrics):
        self.task = task
        self.console = console
        self.metrics = metrics
        self.max_retries = args.max_retries
        self.in_process = args.isolation == "process"
        self.child_task = (args.task, args.dot_seconds)  # what a child process loads: it imports on its own
        self.time_limit = args.time_limit
        self.no_new_tasks = threading.Event()
        self.todo: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self.finished: queue.SimpleQueue[tuple[Delivery, Result]] = queue.SimpleQueue()
        self.state_lock = threading.Lock()
        self.awaited: Delivery | None = None
        self.local = threading.local()  # each thread's number, and its child process
        self.wake: Callable[[Delivery], None] = lambda delivery: None  # set by the Worker
        # --isolation process: each thread starts its child before it takes a task (see wait_ready).
        self.starting = threading.Semaphore(0)  # released once by each thread when it is ready
        self.threads = args.concurrency
        self.children: list[ChildProcess] = []
        self.closing = threading.Event()  # set at exit: no child is started any more
        for number in range(1, args.concurrency + 1):
            # Daemon threads: a worker that exits on an error does not wait for a hung task.
            threading.Thread(target=self.serve, args=(number,), name=f"task-{number}", daemon=True).start()

    def wait_ready(self) -> None:
        """Before consuming: wait until every thread's child process (--isolation process) has started, so
        that a task is never the first thing a child does (and a stop signalled to the group meanwhile
        finds every child past the point where it ignores SIGINT and SIGTERM)."""
        for _ in range(self.threads):
            self.starting.acquire(timeout=CHILD_START_SECONDS + 5)

    def kill_children(self) -> None:
        """At exit: kill the child processes, and start no new one. They do not stop on SIGTERM (the worker
        decides when to stop), which is all that multiprocessing's own exit handler would send them."""
        self.closing.set()
        for _ in range(2):  # twice: a task thread may have been starting a child as we began
            for child in self.children:
                process = child.process
                if process is not None and process.is_alive():
                    process.kill()
                    process.join(timeout=5)
            time.sleep(0.05)

    def submit(self, delivery: Delivery) -> None:
        self.todo.put(delivery)

    def wait_for(self, delivery: Delivery, seconds: float) -> tuple[Delivery, Result] | None:
        """In the connection's thread: the first (delivery, result) to finish within `seconds`, or None.
        While we wait for `delivery`, its task thread does not wake us; it does again afterwards."""
        with self.state_lock:
            self.awaited = delivery
        try:
            done = self.finished.get(timeout=seconds)
        except queue.Empty:
            done = None
        with self.state_lock:
            self.awaited = None
        return done

    def drop(self, delivery: Delivery) -> bool:
        """In the connection's thread: keep a delivery that waits for a thread from starting."""
        with self.state_lock:
            if delivery.state is TaskState.WAITING:
                delivery.state = TaskState.DROPPED
                return True
            return False

    def serve(self, number: int) -> None:
        """A task thread: take a delivery, run it, report. Whatever happens becomes the task's
        result, never a dead thread."""
        self.local.number, self.local.child = number, None
        try:
            if self.in_process:
                self.local.child = ChildProcess(*self.child_task)
                self.children.append(self.local.child)  # (list.append is atomic) for kill_children() at exit
                self.local.child.start()  # if it fails, the first task tries again and fails with the reason
        finally:
            self.starting.release()
        while True:
            delivery = self.todo.get()
            with self.state_lock:
                if delivery.state is TaskState.DROPPED:
                    continue
                delivery.state = TaskState.RUNNING
            try:
                result = self.run(delivery)
            except BaseException as error:  # around the task (printing its line, say): the task failed
                result = Result(Outcome.FAILED, reason(error))
            with self.state_lock:
                self.finished.put((delivery, result))
                awaited = self.awaited is delivery
            if not awaited:  # the connection's thread is not waiting for this one: wake it
                self.wake(delivery)
            child = self.local.child
            if child and child.process is None and not (self.no_new_tasks.is_set() or self.closing.is_set()):
                child.start()  # after a kill: a fresh child for the next task, once this result is out

    def run(self, delivery: Delivery) -> Result:
        if self.no_new_tasks.is_set():
            return Result(Outcome.NOT_STARTED)
        thread = self.local.number
        attempt = ""
        if delivery.retries:  # a retry: which attempt (--max-retries may have been lowered since the last one)
            of = f"of {self.max_retries + 1}" if delivery.retries <= self.max_retries else "past --max-retries"
            attempt = f" (attempt {delivery.retries + 1} {of})"
        again = " (redelivered)" if delivery.redelivered else ""
        if delivery.returns.every > 1:
            again = f" (redelivered {delivery.returns.every} times)"
        self.console.say(f"[x] Received '{delivery.label}'{attempt}{again}", thread)
        self.metrics.task_started()
        if self.in_process:
            try:
                why, seconds = self.local.child.run(delivery.body, self.time_limit)
            except Exception as error:  # around the child (a pipe error we did not foresee): the task failed
                why, seconds = reason(error), 0.0
        else:
            started = time.monotonic()
            try:
                self.task(delivery.body)
                why = None
            except BaseException as error:  # SystemExit from a task too: the task failed, the worker goes on
                why = reason(error)
            seconds = time.monotonic() - started
        self.metrics.task_ran(seconds)
        return Result(Outcome.FAILED if why else Outcome.DONE, why, seconds, thread)


# Child processes start from a fresh interpreter: no threads, sockets or locks of the worker in them.
PROCESSES = multiprocessing.get_context("spawn")
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # the worker's to act on, never a child's


class ChildProcess:
    """A child process that runs one task thread's tasks, one at a time, over a pipe.

    Python cannot stop a thread, but it can kill a process: at the time limit, or when a task
    killed its own process, the child is killed and reaped, the task counts as failed, and the
    next task starts a new child. Only the task thread that made it uses it.
    """

    def __init__(self, task_spec: str | None, dot_seconds: float):
        self.task_spec, self.dot_seconds = task_spec, dot_seconds
        self.process: multiprocessing.process.BaseProcess | None = None  # started by TaskPool.serve

    def start(self) -> str | None:
        """Start a child and wait until it has loaded the task (a time limit counts the task's time,
        not the start-up's). None once it is ready, else why it could not start (it is reaped)."""
        self.pipe, child_end = PROCESSES.Pipe()
        self.process = PROCESSES.Process(
            target=child_main, args=(child_end, self.task_spec, self.dot_seconds), name="task", daemon=True
        )
        try:
            self.process.start()
        except OSError as error:  # no memory, no process slot left
            child_end.close()
            self.pipe.close()
            self.process = None
            return f"the child process to run it could not start: {error}"
        child_end.close()
        try:
            if self.pipe.poll(CHILD_START_SECONDS) and self.pipe.recv() == "ready":
                return None
            why = f"did not start within {CHILD_START_SECONDS:g}s"
        except (EOFError, OSError):  # it died while starting (an import that failed, a signal)
            self.process.join(timeout=5)
            why = f"died while starting: {died_how(self.process.exitcode)}"
        self.stop()
        return f"the child process to run it {why}"

    def stop(self) -> None:
        """Kill the child and reap it."""
        self.process.kill()
        self.process.join()
        self.pipe.close()
        self.process = None

    def run(self, body: bytes, time_limit: float | None) -> tuple[str | None, float]:
        """Run one task in the child: (None if it was done, else why it failed; seconds it ran)."""
        if self.process is None or not self.process.is_alive():  # the first task, or after a death
            if self.process is not None:
                self.stop()
            not_started = self.start()
            if not_started:
                return not_started, 0.0
        started = time.monotonic()
        why = None
        try:
            self.pipe.send_bytes(body)
            if self.pipe.poll(time_limit):  # time_limit None: wait as long as it takes
                return self.pipe.recv(), time.monotonic() - started  # None, or why; EOFError if it died
            why = f"time limit of {time_limit:g} s exceeded"
        except (EOFError, OSError):
            pass  # the child died under the task
        seconds = time.monotonic() - started
        self.process.kill()
        self.process.join()
        why = why or died_how(self.process.exitcode)
        self.stop()  # TaskPool.serve starts the next one once this result is out
        return why, seconds


def died_how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = f" ({signal.Signals(-exitcode).name})"
        except ValueError:
            name = ""
        return f"killed by signal {-exitcode}{name}"
    return f"its process exited with code {exitcode}"


def child_main(pipe, task_spec: str | None, dot_seconds: float) -> None:
    """In a child process: run each task the worker sends; answer None, or why it failed."""
    # Ctrl+C reaches the whole process group, and a service manager's stop (systemd's KillMode=control-group,
    # a container runtime) signals every process: the worker decides, and finishes the running task first.
    for signum in STOP_SIGNALS:  # a handler that does nothing, not SIG_IGN: a program the task starts gets
        signal.signal(signum, lambda *_: None)  # the default action back, and stops when told to
    die_with_the_worker()
    task = load_task(task_spec) if task_spec else dot_task(dot_seconds)
    pipe.send("ready")
    while True:
        try:
            body = pipe.recv_bytes()
        except EOFError:  # the worker is gone
            return
        try:
            task(body)
            pipe.send(None)
        except BaseException as error:
            pipe.send(reason(error))


def die_with_the_worker() -> None:
    """Linux: get SIGKILL when the worker's thread that started us ends (say, kill -9 of the worker),
    rather than linger with a hung task. Elsewhere the child ends when its pipe closes."""
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# --- The connection side: consume, hand over, settle -------------------------------------


class Worker:
    """Consumes deliveries, hands each to the TaskPool, and acks, retries or dead-letters it.

    Everything here runs in the main thread, which owns the connection and its channel, and
    owns `in_hand` and the flags below. A task thread only wakes this thread up, through
    connection.add_callback_threadsafe (the one thread-safe call of a BlockingConnection).
    """

    def __init__(self, args: argparse.Namespace, tasks: TaskPool, console: Console, metrics):
        self.args = args
        self.tasks = tasks
        self.metrics = metrics
        self.say = console.say
        self.dead_letter_queue = workqueue.dead_letter_queue(args.queue)
        self.stopping = False  # set by the first signal, or once --max-tasks tasks were started
        self.signalled = False
        self.started = 0  # tasks handed to the pool; --max-tasks counts these
        self.channel: BlockingChannel | None = None  # the current channel
        self.publish_backoff = workqueue.Backoff()  # pauses while publishing retries or dead letters fails
        # How often a consumer timeout took each task back from us while it ran (by Delivery.identity).
        self.timed_out: dict[str, int] = {}
        self.retired: set[BlockingChannel] = set()  # channels left while tasks of theirs still run (4.3)
        # Failed tasks whose retry or dead letter the broker refused: held (unacked) until published.
        self.awaiting_publish: set[Delivery] = set()
        # Delivered and not settled yet: on the current channel, or running still after their channel died.
        self.in_hand: set[Delivery] = set()

    def run(self) -> int:
        """Connect, consume, and reconnect after every loss, until told to stop."""
        self.tasks.wait_ready()
        urls = workqueue.broker_urls(self.args.url)
        retry_for = self.args.connect_timeout
        backoff = workqueue.Backoff()
        while not self.stopping:
            connected = workqueue.connect(urls, retry_for, should_stop=lambda: self.stopping)
            if connected is None:
                break
            if retry_for is None:  # a connection opened again after a loss (a try that a stop cut short is none)
                self.metrics.reconnected()
            connection, url = connected
            retry_for = None  # once connected, a later loss is retried until we are stopped
            opened = time.monotonic()
            try:
                self.consume(connection)
                connection.close()
            except pika.exceptions.AMQPError as error:
                refused = workqueue.access_refused(error, url)
                if refused:
                    raise refused from None  # a reconnect cannot cure missing permissions
                if not workqueue.is_connection_lost(error):
                    raise
                self.drop_not_started()
                running = len(self.in_hand) if not self.args.auto_ack else 0
                LOGGER.warning("connection lost: %s; reconnecting%s", workqueue.describe(error), lost_acks(running))
                self.metrics.lost(f"broker lost ({workqueue.describe(error)}): reconnecting")
                if connection.is_open:
                    try:
                        connection.close()
                    except pika.exceptions.AMQPError:
                        pass
                if time.monotonic() - opened > STEADY_SECONDS:
                    backoff.reset()
                workqueue.sleep_unless(backoff.next(), lambda: self.stopping)  # never a tight loop
        self.finish_orphans()
        return workqueue.EXIT_OK

    def consume(self, connection: pika.BlockingConnection) -> None:
        """Declare the queues, take tasks until told to stop, then settle the running ones.

        A consumer that the broker cancels, or a channel it closes over a consumer timeout, is
        replaced by a fresh channel: its deliveries are the broker's again, and none of them may be
        acked (or started) on the next channel."""
        self.settle_finished()  # tasks of an earlier connection that ended meanwhile: report their lost acks
        self.tick(connection)
        while not self.stopping:
            channel = self.channel = connection.channel()
            channel.basic_qos(prefetch_count=self.args.prefetch)  # at most N unacked tasks at this worker
            channel.confirm_delivery()  # our retry and dead-letter publishes wait for the broker's OK
            # The work queue, its dead-letter queue, and the wait queues where a failed task waits until
            # the broker moves it back.
            for name in (self.args.queue, self.dead_letter_queue, *self.wait_queues()):
                self.declare(connection, name)
            if self.args.max_tasks is not None and self.started >= self.args.max_tasks:
                self.stopping = True  # --max-tasks 0, or all taken before a reconnect: none more
                break
            channel.basic_consume(
                queue=self.args.queue,
                on_message_callback=self.on_message,
                auto_ack=self.args.auto_ack,
                arguments=self.consumer_arguments(),
            )
            self.metrics.consuming()  # before the line: a probe that reads it finds the worker healthy
            self.say("[*] Waiting for messages. To exit press CTRL+C")
            try:
                channel.start_consuming()  # until our consumer is cancelled, by us or by the broker
            except pika.exceptions.ChannelClosedByBroker as error:
                if not is_consumer_timeout(error):
                    raise
                # Before 4.3: the broker closed the channel, and every task it held is the broker's again.
                taken_back = self.oldest_running(channel)
                timeout = re.search(r"Timeout value used: (\d+) ms", error.reply_text)
                limit = f" of {int(timeout[1]) / 1000:g}s" if timeout else ""
                why = f"the broker's consumer timeout{limit} took back our tasks; {self.consumer_timeout_hint()}"
                self.leave_channel(channel, why, taken_back)
            else:
                if self.stopping:
                    break
                why, taken_back = self.why_cancelled(connection, channel)
                self.leave_channel(channel, why, taken_back)
            if taken_back:
                # The task taken back comes straight back to us: consume again once a thread is free
                # to run it, or it waits past the timeout again.
                while self.running() >= self.args.concurrency and not self.stopping:
                    connection.process_data_events(time_limit=0.25)
                    self.settle_finished()
        while self.in_hand:  # warm shutdown: the running tasks' acks go out here
            connection.process_data_events(time_limit=0.25)
            self.settle_finished()

    def running(self) -> int:
        return sum(1 for delivery in self.in_hand if delivery.state is TaskState.RUNNING)

    def oldest_running(self, channel: BlockingChannel) -> Delivery | None:
        """The task of this channel held longest: the first a consumer timeout takes back."""
        running = [d for d in self.in_hand if d.channel is channel and d.state is TaskState.RUNNING]
        return min(running, key=lambda delivery: delivery.received, default=None)

    def consumer_timeout_hint(self) -> str:
        if self.args.consumer_timeout is not None:
            return f"for tasks this long, raise --consumer-timeout (now {self.args.consumer_timeout:g}s; RabbitMQ 4.3)"
        return "for tasks this long, raise the broker's consumer_timeout, or give --consumer-timeout (RabbitMQ 4.3)"

    def consumer_arguments(self) -> dict:
        """x-consumer-timeout (RabbitMQ 4.3; older brokers ignore it): how long the broker lets this
        consumer hold a task unacked before it takes the task back."""
        if self.args.consumer_timeout is None:
            return {}
        return {"x-consumer-timeout": round(self.args.consumer_timeout * 1000)}

    def why_cancelled(
        self, connection: pika.BlockingConnection, channel: BlockingChannel
    ) -> tuple[str, Delivery | None]:
        """The broker cancelled our consumer, and basic.cancel carries no reason: tell the usual ones
        apart. Returns what to say, and the task a consumer timeout took back (None if it was not one)."""
        oldest = self.oldest_running(channel)
        for attempt in range(1 if oldest else 4):  # a queue being deleted can still answer for a moment (4.3)
            if attempt:
                connection.sleep(0.25)
            try:
                with workqueue.short_channel(connection) as probe:
                    probe.queue_declare(queue=self.args.queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker as error:
                if error.reply_code != 404:
                    raise
                deleted = (
                    f"the broker cancelled our consumer: queue '{self.args.queue}' was deleted; declaring it again"
                )
                return deleted, None
        held_for = time.monotonic() - oldest.received if oldest else 0.0
        known = self.args.consumer_timeout
        if oldest and (known is None or held_for >= known - 1):
            # RabbitMQ 4.3 cancels the consumer, rather than close the channel, when a task is held too long.
            why = (
                f"the broker cancelled our consumer while it held '{oldest.label}' for {held_for:.0f}s: "
                f"most likely a consumer timeout took it back; {self.consumer_timeout_hint()}"
            )
            return why, oldest
        return (
            "the broker cancelled our consumer (its queue was deleted and declared again, or the node holding "
            "it is down); consuming again",
            None,
        )

    def leave_channel(self, channel: BlockingChannel, why: str, taken_back: Delivery | None) -> None:
        """Say why, and consume on a fresh channel from now on.

        A channel that the broker closed took its tasks back: those not started are dropped, the
        running ones' acks are lost. A channel whose consumer the broker cancelled (4.3) stays
        open for its running tasks' acks; its tasks not started go back now, and it is closed once
        it holds none. A task a consumer timeout took back is not acked, and counted (see on_message)."""
        if taken_back:
            taken_back.taken_back = True
            self.timed_out[taken_back.identity] = self.timed_out.get(taken_back.identity, 0) + 1
            if len(self.timed_out) > 10_000:  # remember the most recent ones
                del self.timed_out[next(iter(self.timed_out))]
        if channel.is_open:
            for delivery in [d for d in self.in_hand if d.channel is channel]:
                if self.tasks.drop(delivery):
                    self.in_hand.discard(delivery)
                    channel.basic_nack(delivery.delivery_tag, requeue=True)
            self.retired.add(channel)
            self.close_if_idle(channel)
            lost = 1 if taken_back else 0
        else:
            self.drop_not_started()
            lost = sum(1 for d in self.in_hand if d.channel is channel)
        LOGGER.warning("%s%s", why, lost_acks(lost))
        self.metrics.lost(why)

    def close_if_idle(self, channel: BlockingChannel) -> None:
        """Close a channel we left, once no task of it is in hand any more."""
        if channel in self.retired and not any(d.channel is channel for d in self.in_hand | self.awaiting_publish):
            self.retired.discard(channel)
            if channel.is_open:
                try:
                    channel.close()
                except pika.exceptions.AMQPError:
                    pass

    def on_message(self, channel: BlockingChannel, method, properties, body: bytes) -> None:
        """A task arrived: hand it to a task thread (or straight back, if we are stopping)."""
        self.act_on_stop()
        retries, complaint = retries_of(properties)
        returns = returns_of(properties)
        delivery = Delivery(channel, method.delivery_tag, body, properties, method.redelivered, retries, returns)
        if complaint:
            LOGGER.warning("%s (task '%s')", complaint, delivery.label)
        if self.stopping and not self.args.auto_ack:  # auto-acked tasks are ours alone: do them
            self.hand_back(delivery)
            return
        taken_back = self.timed_out.get(delivery.identity, 0) if method.redelivered else 0
        unrun = policy.unrun_because(returns.counted, taken_back, self.args.max_retries)
        if unrun and not self.args.auto_ack:
            # A crash loop (its workers died with it) or a task longer than the consumer timeout: another
            # run would end the same way. It goes to the dead-letter queue instead, before RabbitMQ 4's
            # delivery limit would drop it without a word.
            why, unfinished = unrun
            self.retry_or_dead_letter(delivery, Result(Outcome.FAILED, why), final=True, unfinished=unfinished)
            return
        self.in_hand.add(delivery)  # before submit(): its result may come back at once
        self.tasks.submit(delivery)
        self.started += 1
        if self.args.max_tasks is not None and self.started >= self.args.max_tasks:
            self.stop_taking_tasks(channel)
        if len(self.in_hand) == 1:
            # Most tasks of a work queue are short: wait a moment, and a lone quick task is acked
            # from here at once, not after another turn of the connection's loop.
            done = self.tasks.wait_for(delivery, QUICK_TASK_SECONDS)
            if done:
                self.settle(*done)
            self.settle_finished()  # any that finished meanwhile without waking us (they saw us waiting)

    def wake(self, delivery: Delivery) -> None:
        """In a task thread, as its task ends: ask the connection's thread to settle it."""
        try:
            delivery.channel.connection.add_callback_threadsafe(self.settle_finished)
        except pika.exceptions.ConnectionWrongStateError:
            pass  # that connection is gone: tick() or finish_orphans() reports the lost ack

    def tick(self, connection: pika.BlockingConnection) -> None:
        """Every 0.2 s, in the connection's thread: act on a signal (its handler only sets flags),
        and settle tasks whose wake-up could not reach us because their connection had died."""
        if not connection.is_open:
            return
        self.act_on_stop()
        self.settle_finished()
        connection.call_later(0.2, functools.partial(self.tick, connection))

    def act_on_stop(self) -> None:
        """After a signal, cancel the consumer at the first chance: in tick(), on_message() or before
        an ack (an ack would let the broker send the next task, only for it to go back)."""
        if self.stopping and self.channel and self.channel.is_open and self.channel.consumer_tags:
            self.stop_taking_tasks(self.channel)

    def stop_taking_tasks(self, channel: BlockingChannel) -> None:
        """Cancel the consumer: no more deliveries. After a signal, also give back every task that
        has not started; after --max-tasks, the tasks taken are all run."""
        self.stopping = True
        self.metrics.lost("shutting down")
        for tag in list(channel.consumer_tags):
            # Cancel first: a task handed back while the consumer still runs would come straight
            # back to it, and go back a second time. pika returns deliveries it had not handed to
            # on_message yet; an auto-ack consumer's come back to us instead: ours alone, so do them.
            for method, properties, body in channel.basic_cancel(tag):
                self.on_message(channel, method, properties, body)
        if self.tasks.no_new_tasks.is_set():  # set by the signal (never with --auto-ack)
            for delivery in list(self.in_hand):
                if self.tasks.drop(delivery):  # still waiting for a thread
                    self.in_hand.discard(delivery)
                    self.hand_back(delivery)
        for delivery in list(self.awaiting_publish):  # failed, and not recorded yet: back to the queue
            self.awaiting_publish.discard(delivery)
            if delivery.channel.is_open:
                delivery.channel.basic_reject(delivery.delivery_tag, requeue=True)
                self.say(f"[*] Handed back '{delivery.label}' (its failure was not recorded yet): shutting down")
        if self.signalled and self.in_hand:
            running = workqueue.plural(len(self.in_hand), "running task")
            self.say(f"[*] Finishing {running} first (press CTRL+C again to quit now)")

    def hand_back(self, delivery: Delivery) -> None:
        """Shutting down: a task we hold but did not start goes back to the queue, untouched. A nack
        says "could not take it": RabbitMQ 4.3 does not count it toward the queue's delivery limit."""
        if delivery.channel.is_open:
            delivery.channel.basic_nack(delivery.delivery_tag, requeue=True)
            self.say(f"[*] Handed back '{delivery.label}' untouched: shutting down")

    def drop_not_started(self) -> None:
        """The channel died: its deliveries still waiting for a thread must not run (the broker has
        requeued them), and nothing of that channel may be acked on the next one."""
        self.awaiting_publish = {d for d in self.awaiting_publish if d.channel.is_open}  # the broker has the rest
        if self.args.auto_ack:
            return  # auto-acked tasks are ours alone: do them rather than lose them
        for delivery in list(self.in_hand):
            if self.tasks.drop(delivery):
                self.in_hand.discard(delivery)

    def finish_orphans(self) -> None:
        """Leaving while disconnected: let the running tasks end (their acks are lost), then go."""
        while self.in_hand:
            self.settle(*self.tasks.finished.get())

    # Back in the connection's thread: ack, retry or dead-letter.

    def settle_finished(self) -> None:
        while True:
            try:
                delivery, result = self.tasks.finished.get_nowait()
            except queue.Empty:
                return
            self.settle(delivery, result)

    def settle(self, delivery: Delivery, result: Result) -> None:
        self.act_on_stop()  # before an ack: the broker would send the next task at once
        self.in_hand.discard(delivery)
        channel = delivery.channel  # its own channel, never another: delivery tags are per channel
        if result.why and result.why.startswith("time limit of"):
            self.metrics.settled("timed_out")  # counted once, whatever becomes of the task
        if result.outcome is Outcome.NOT_STARTED:
            self.hand_back(delivery)
        elif self.args.auto_ack:
            self.metrics.settled("done" if result.outcome is Outcome.DONE else "lost")
            self.say(
                f"[x] Done '{delivery.label}' in {result.seconds:.1f}s"
                if result.outcome is Outcome.DONE
                else f"[!] Failed '{delivery.label}': {result.why} (auto-ack: the task is lost)",
                result.thread,
            )
        elif delivery.taken_back:
            self.metrics.settled("lost")
            self.say(
                f"[!] Could not ack '{delivery.label}': the broker's consumer timeout took it back, and redelivers it",
                result.thread,
            )
        elif not channel.is_open:
            self.metrics.settled("lost")
            gone = "channel" if channel.connection.is_open else "connection"
            self.say(
                f"[!] Could not ack '{delivery.label}': its {gone} is gone; the broker redelivers it if it kept it",
                result.thread,
            )
        elif result.outcome is Outcome.DONE:
            try:
                channel.basic_ack(delivery.delivery_tag)
            except pika.exceptions.AMQPError:  # the connection died just now: say so, then reconnect
                self.metrics.settled("lost")
                self.say(f"[!] Could not ack '{delivery.label}': its connection is gone; the broker redelivers it",
                         result.thread)  # fmt: skip
                raise
            self.metrics.settled("done")
            self.say(f"[x] Done '{delivery.label}' in {result.seconds:.1f}s", result.thread)
        else:
            self.retry_or_dead_letter(delivery, result)
        self.close_if_idle(channel)

    def wait_queues(self) -> dict[str, float]:
        """The wait queue of each delay that --max-retries can reach: {name: delay}."""
        delays = policy.wait_delays(self.args.retry_delays, self.args.max_retries)
        return {workqueue.wait_queue(self.args.queue, delay): delay for delay in delays}

    def retry_or_dead_letter(
        self, delivery: Delivery, result: Result, final: bool = False, unfinished: int = 0
    ) -> None:
        """Publish the failed task to a wait queue (or straight back) or to the DLQ, confirmed, then ack it.
        `final`: to the DLQ, whatever retries are left (the crash-loop guards), after `unfinished` runs
        that ended with no result (its worker died, or a consumer timeout took it back).

        While a retry waits, no worker holds it: it sits in a durable queue whose TTL hands it back
        to the work queue when its delay is over, through a broker restart or a killed worker."""
        headers = workqueue.without_broker_headers(delivery.properties.headers)
        failed = delivery.retries  # failed attempts before this one
        retry, delay = policy.after_failure(failed, self.args.max_retries, self.args.retry_delays, final)
        if retry is not None:
            headers["x-retries"] = retry
            if delay:
                target = workqueue.wait_queue(self.args.queue, delay)
                due = time.strftime("%H:%M:%S", time.localtime(time.time() + delay))
                what = f"retry {retry} of {self.args.max_retries} in {delay:g}s (at {due}, waiting in {target})"
            else:
                target, what = self.args.queue, f"retry {retry} of {self.args.max_retries} now"
        else:
            headers.update(
                {
                    "x-retries": failed,  # runs that failed before this one
                    "x-error": result.why[:200],
                    "x-original-queue": self.args.queue,
                    "x-failed-at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
            )
            if unfinished:  # runs that ended with no result, this time not run at all (dead_letters.py counts them)
                headers["x-unfinished-runs"] = unfinished
            target, what = self.dead_letter_queue, f"moved to {self.dead_letter_queue}"
        try:
            delivery.channel.basic_publish(
                exchange="",
                routing_key=target,
                body=delivery.body,
                properties=republished(delivery.properties, headers),
                mandatory=True,
            )
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as error:
            # Its failure is not recorded yet: we keep the delivery (unacked, it holds its prefetch
            # slot) and publish again after a pause that grows while publishing keeps failing. Handing
            # it back would run it again at once, and count toward RabbitMQ 4's delivery limit.
            missing = isinstance(error, pika.exceptions.UnroutableError)
            refused = "no such queue" if missing else "the broker refused it"
            if self.stopping:  # no time to wait: it goes back, and counts as a failed delivery
                delivery.channel.basic_reject(delivery.delivery_tag, requeue=True)
                self.say(f"[!] Failed '{delivery.label}': {result.why}; could not publish to {target} ({refused}); "
                         "handed it back: shutting down", result.thread)  # fmt: skip
                return
            pause = self.publish_backoff.next()
            self.say(
                f"[!] Failed '{delivery.label}': {result.why}; could not publish to {target} ({refused}); "
                f"trying again in {pause:g}s",
                result.thread,
            )
            self.awaiting_publish.add(delivery)
            again = functools.partial(
                self.publish_again, delivery, result, final, unfinished, target if missing else None
            )
            delivery.channel.connection.call_later(pause, again)
            return
        except pika.exceptions.AMQPError:  # the connection died just now: say so, then reconnect
            self.metrics.settled("lost")
            self.say(f"[!] Failed '{delivery.label}': {result.why}; could not record it, its connection is gone; "
                     "the broker redelivers it", result.thread)  # fmt: skip
            raise
        self.publish_backoff.reset()
        try:
            delivery.channel.basic_ack(delivery.delivery_tag)
        except pika.exceptions.AMQPError:  # recorded, but the ack died with the connection: it runs again too
            self.metrics.settled("lost")
            self.say(f"[!] Failed '{delivery.label}': {result.why}; published to {target}, but the ack was lost "
                     "with its connection: the broker redelivers it too", result.thread)  # fmt: skip
            raise
        self.metrics.settled("dead_lettered" if target == self.dead_letter_queue else "retried")
        self.say(f"[!] Failed '{delivery.label}': {result.why}; {what}", result.thread)

    def publish_again(
        self, delivery: Delivery, result: Result, final: bool, unfinished: int, declare: str | None
    ) -> None:
        """After a pause: publish a failed task's retry or dead letter again, declaring its queue first
        if it had gone (deleted under us)."""
        if delivery not in self.awaiting_publish:
            return  # handed back by a warm shutdown meanwhile
        self.awaiting_publish.discard(delivery)
        if not delivery.channel.is_open:
            return  # its channel died: the broker has it back, and redelivers it
        if declare:
            try:
                self.declare(delivery.channel.connection, declare)
            except pika.exceptions.ChannelClosedByBroker as error:  # say why; the publish fails again, later
                LOGGER.warning("could not declare %s again: %s", declare, workqueue.describe(error))
        self.retry_or_dead_letter(delivery, result, final, unfinished)

    def declare(self, connection: pika.BlockingConnection, name: str) -> None:
        """Declare one of our queues (the work queue, a wait queue, the dead-letter queue) by its name."""
        if name == self.dead_letter_queue:
            workqueue.declare_dead_letter_queue(connection, self.args.queue, self.args.queue_type)
            return
        delays = self.wait_queues()
        with workqueue.short_channel(connection) as channel:
            if name in delays:
                arguments = workqueue.wait_queue_arguments(self.args.queue, self.args.queue_type, delays[name])
            else:
                arguments = workqueue.queue_arguments(self.args.queue_type)
            channel.queue_declare(queue=name, durable=True, arguments=arguments)

    # Signals: the first asks for a warm shutdown, the second quits at once.

    def on_signal(self, signum, _frame) -> None:
        if self.signalled:
            os.write(
                2,
                f"{self.args.name} [!] Cold shutdown: exiting now; unacked tasks are requeued\n".encode(),
            )
            os._exit(128 + signum)
        self.stopping = self.signalled = True
        self.metrics.problem = "shutting down"  # (an attribute write: safe in a signal handler)
        if not self.args.auto_ack:
            self.tasks.no_new_tasks.set()  # from now on no task starts; tick() cancels the consumer
        os.write(1, f"{self.args.name} [*] Warm shutdown: taking no new tasks\n".encode())


def is_consumer_timeout(error: BaseException) -> bool:
    """RabbitMQ before 4.3 closes the channel when a delivery stays unacked past its consumer timeout."""
    return (
        isinstance(error, pika.exceptions.ChannelClosedByBroker)
        and error.reply_code == 406
        and "acknowledgement" in error.reply_text
        and "timed out" in error.reply_text
    )


def lost_acks(running: int) -> str:
    if not running:
        return ""
    if running == 1:
        return " (1 task still running: its ack is lost, so the broker will redeliver it if it kept it)"
    return f" ({running} tasks still running: their acks are lost, so the broker will redeliver them if it kept them)"


def reason(error: BaseException | None) -> str:
    """What a failed task's error says, for its line and its x-error header."""
    return f"{type(error).__name__}: {error}"[:200]


def republished(properties: pika.BasicProperties, headers: dict) -> pika.BasicProperties:
    """The task's own properties (message_id, correlation_id, content_type...) with new headers."""
    properties = copy.copy(properties)
    properties.headers = headers
    properties.delivery_mode = properties.delivery_mode or pika.DeliveryMode.Persistent
    if properties.user_id is not None:
        # The broker refuses a user_id other than the publisher's own: keep it as a header instead.
        headers.setdefault("x-user-id", properties.user_id)
        properties.user_id = None
    return properties


def serve_metrics(args: argparse.Namespace) -> Metrics:
    """--metrics-port: Prometheus metrics and /healthz, from a thread of their own."""
    try:
        return Metrics(args.queue, args.metrics_host, args.metrics_port)
    except ImportError as error:
        raise workqueue.UsageError(
            f"--metrics-port needs prometheus-client ({error}): pip install -r requirements.txt"
        ) from None
    except OSError as error:
        raise workqueue.UsageError(
            f"--metrics-port {args.metrics_port}: cannot listen on {args.metrics_host}: {error.strerror}"
        ) from None


def main() -> int:
    args = make_argument_parser().parse_args()
    workqueue.setup_logging(args.name)
    if args.auto_ack and args.max_tasks is not None:
        raise workqueue.UsageError(
            "--max-tasks cannot be exact with --auto-ack: the broker hands an auto-ack consumer every "
            "waiting task at once, and a task it handed over cannot go back"
        )
    if args.prefetch is None:
        args.prefetch = args.concurrency
    if args.time_limit is not None and args.isolation == "thread":
        raise workqueue.UsageError(
            "--time-limit needs --isolation process: a thread cannot be stopped, a child process can"
        )
    args.isolation = args.isolation or ("process" if args.time_limit is not None else "thread")
    if args.consumer_timeout is None and args.time_limit is not None and args.prefetch:
        # Each task it holds may wait for the ones before it, each up to the time limit.
        rounds = -(-args.prefetch // args.concurrency)
        args.consumer_timeout = rounds * args.time_limit + 60
    for url in workqueue.broker_urls(args.url):
        workqueue.connection_parameters(url)  # a bad URL is a usage error, before connecting
    task = load_task(args.task) if args.task else dot_task(args.dot_seconds)
    if args.auto_ack:
        LOGGER.warning("auto-ack: the broker forgets each task when it is delivered; a crash loses it")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 PID: where is each thread stuck?
    console = Console(args.name, show_threads=args.concurrency > 1)
    metrics = serve_metrics(args) if args.metrics_port else NoMetrics()
    tasks = TaskPool(args, task, console, metrics)
    worker = Worker(args, tasks, console, metrics)
    tasks.wake = worker.wake
    signal.signal(signal.SIGINT, worker.on_signal)
    signal.signal(signal.SIGTERM, worker.on_signal)
    try:
        return worker.run()
    finally:
        tasks.kill_children()


if __name__ == "__main__":
    workqueue.run(main)
