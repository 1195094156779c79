"""The task side of worker.py: threads (and child processes) that run tasks and never touch the broker.

A Delivery is one task as it came from the broker. The Worker (the connection's thread) puts it in
the TaskPool; a task thread runs it, in itself or in a child process of its own, and puts its Result
in `finished`, then wakes the connection's thread, which decides what becomes of it and acks it.
"""

from __future__ import annotations

import argparse
import enum
import functools
import hashlib
import importlib
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import pika
from pika.adapters.blocking_connection import BlockingChannel

import workqueue
from workqueue.policy import Outcome, Past, is_high_priority, queued_since

CHILD_START_SECONDS = 60.0  # a child process (--isolation process) must be ready to take tasks by then
# Where the worker's own modules are: this package, and the scripts beside it (worker.py, new_task.py, ...).
OWN_DIRECTORIES = (
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
)


def load_task(spec: str) -> Callable[[bytes], object]:
    """MODULE:FUNCTION, importable from the current directory or PYTHONPATH."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise workqueue.UsageError(f"--task wants MODULE:FUNCTION, not {spec!r}")
    already = sys.modules.get(module_name)
    if (
        already is not None
        and os.path.dirname(os.path.abspath(getattr(already, "__file__", None) or "/")) in OWN_DIRECTORIES
    ):
        # import_module would hand back ours (workqueue, worker, ...), not the user's module of that name.
        raise workqueue.UsageError(
            f"--task {spec}: {module_name} is a module of this worker ({module_name}.py); give yours another name"
        )
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
    past: Past  # failed runs and returns so far, from its headers (policy.past_of)
    state: TaskState = TaskState.WAITING  # see TaskPool
    taken_back: bool = False  # by the broker's consumer timeout: not ours to ack (Consumer.took_back)
    in_child: bool = False  # run it in a child process of its own (policy: it came back unacked, or crashed)
    # (Set by the connection's thread before submit(): the queue hands it over to a task thread, set.)
    received: float = field(default_factory=time.monotonic)  # when it came (time.monotonic())
    consumer: object = None  # the worker.Consumer of its channel: the one to settle it
    # Console.after(): the line its task thread's next task waits to print until this one's outcome is said.
    said: bool = False  # its outcome line is out (Done, Failed, Could not ack...)
    next_line: tuple[str, int] | None = None

    @property
    def label(self) -> str:
        return workqueue.printable(self.body, limit=50)

    @property
    def identity(self) -> str:
        return message_identity(self.properties, self.body)

    @functools.cached_property  # (a derived one hashes the body)
    def task_id(self) -> str:
        """Its id: the producer's message_id (workqueue.Producer and new_task.py set one), else one made for
        this delivery (a task from another producer, the tutorial's say), which its retries and dead letter
        then carry."""
        if isinstance(self.properties.message_id, str) and self.properties.message_id:
            return self.properties.message_id
        return str(uuid.uuid5(uuid.NAMESPACE_OID, f"{self.identity}/{self.received}/{self.delivery_tag}"))

    @property
    def short_id(self) -> str:
        """The first 8 characters of its id, for the worker's lines (dead_letters.py list shows it whole)."""
        return workqueue.printable(self.task_id[:8])


def message_identity(properties: pika.BasicProperties, body: bytes) -> str:
    """The same for each delivery of one message (body and the ids a producer sets), to know it again."""
    ids = (properties.message_id, properties.correlation_id, properties.timestamp)
    return hashlib.sha256(repr(ids).encode() + body).hexdigest()


class Result(NamedTuple):
    outcome: Outcome
    why: str | None = None  # why it failed
    seconds: float = 0.0
    thread: int = 0  # which of the --concurrency threads ran it (1..N)


class Console:
    """Lines on stdout, one per event, whole even when several threads print at once, and in the order of the
    events they tell: a task thread starts its next task as soon as one ends, but the connection's thread
    says Done only once it acked it; the next task's Received line waits for that (after())."""

    def __init__(self, name: str, show_threads: bool):
        self.name = name
        self.show_threads = show_threads
        self.lock = threading.Lock()
        self.order = threading.Lock()  # Delivery.said and .next_line, between a task thread and the connection's

    def after(self, previous: Delivery | None, line: str, thread: int) -> None:
        """In a task thread: say `line` once the outcome of `previous` (the task this thread ran before) is out."""
        with self.order:
            if previous is not None and not previous.said:
                previous.next_line = (line, thread)  # said() prints it
                return
        self.say(line, thread)

    def said(self, delivery: Delivery) -> None:
        """In the connection's thread, once it said what became of `delivery`: the line that waited for it."""
        with self.order:
            delivery.said = True
            waiting, delivery.next_line = delivery.next_line, None
        if waiting:
            self.say(*waiting)

    def say(self, line: str, thread: int = 0) -> None:
        label = f"{self.name}/{thread}" if self.show_threads and thread else self.name
        text = workqueue.printable(f"{label} {line}") + "\n"  # a body's escape sequences stay inert
        with self.lock:
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except (OSError, ValueError):  # stdout went away (a closed pipe): work on without it
                pass


# --- Threads that run tasks --------------------------------------------------------------


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
    - `Delivery.said` and `Delivery.next_line` are read and written under `Console.order`: a task thread parks
      its next Received line on the delivery it ran before, unless that one's outcome is out; the
      connection's thread marks the outcome out and prints what was parked (Console.after/said).
    - `may_start()` reads the worker's shutdown record (worker.Shutdown), which a signal handler writes
      in one assignment: a task thread asks it just before it starts a task, so no task starts after
      the first Ctrl+C, even before the connection's thread has acted on it.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        task: Callable[[bytes], object],
        make_task: tuple[Callable, object],
        *,
        console: Console,
        metrics,
        may_start: Callable[[], bool] = lambda: True,
    ):
        self.task = task
        # How a child process (--isolation process) makes the task, importing it on its own: function(argument),
        # (load_task, "MODULE:FUNCTION") or (worker.dot_task, seconds).
        self.make_task = make_task
        self.console = console
        self.metrics = metrics
        self.max_retries = args.max_retries
        self.in_process = args.isolation == "process"
        self.time_limit = args.time_limit
        self.may_start = may_start
        self.todo: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self.finished: queue.SimpleQueue[tuple[Delivery, Result]] = queue.SimpleQueue()
        self.state_lock = threading.Lock()
        self.awaited: Delivery | None = None
        self.local = threading.local()  # each thread's number, and its child process
        # Set by main() before the worker consumes: no task, so no call of it, comes before.
        self.wake: Callable[[Delivery], None] = lambda delivery: None
        # --isolation process: each thread starts its child before it takes a task (see wait_ready).
        self.starting = threading.Semaphore(0)  # released once by each thread when it is ready
        self.threads = args.concurrency
        self.children: list[ChildProcess] = []
        self.closing = threading.Event()  # set at exit: no child is started any more
        # Held to spawn a child, and to set `closing`: once kill_children() has set it, no child is spawned
        # (each is in self.children before it is spawned, so kill_children() finds every one spawned before).
        self.spawning = Spawning(self.closing, threading.Lock())
        # Why a child process could not start, if one could not: the worker's fault, not a task's. Written by
        # task threads (one assignment of a str, atomic), read by the connection's thread.
        self.cannot_run: str | None = None
        for number in range(1, args.concurrency + 1):
            # Daemon threads: a worker that exits on an error does not wait for a hung task.
            threading.Thread(target=self.serve, args=(number,), name=f"task-{number}", daemon=True).start()

    def wait_ready(self) -> None:
        """Before consuming: wait until every thread's child process (--isolation process) has started, so
        that a task is never the first thing a child does (and a stop signalled to the group meanwhile
        finds every child past the point where it ignores SIGINT and SIGTERM)."""
        for _ in range(self.threads):
            self.starting.acquire(timeout=CHILD_START_SECONDS + 5)
        if self.cannot_run:  # no task is taken: they would all fail for the worker's fault
            raise CannotRunTasks(f"cannot run tasks: {self.cannot_run}")

    def kill_children(self) -> None:
        """At exit: kill the child processes, and start no new one. They do not stop on SIGTERM (the worker
        decides when to stop), which is all that multiprocessing's own exit handler would send them."""
        with self.spawning.lock:
            self.closing.set()
        # A copy (list() of a list is atomic under the GIL): a task thread may remove its one-off child meanwhile.
        for child in list(self.children):
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
        self.local.number, self.local.child, self.local.last = number, None, None  # last: the task it ran before
        try:
            if self.in_process:
                self.local.child = ChildProcess(self.make_task, self.spawning)
                self.children.append(self.local.child)  # (list.append is atomic) for kill_children() at exit
                not_started = self.local.child.start()
                if not_started and not self.closing.is_set():
                    self.cannot_run = not_started  # wait_ready() says why
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
            if child and child.process is None and self.may_start() and not self.closing.is_set():
                child.start()  # after a kill: a fresh child for the next task, once this result is out

    def run(self, delivery: Delivery) -> Result:
        if not self.may_start():
            return Result(Outcome.NOT_STARTED)
        thread = self.local.number
        attempt = ""
        retries, returns = delivery.past.retries, delivery.past.returns.every
        if retries:  # a retry: which attempt (--max-retries may have been lowered since the last one)
            of = f"of {self.max_retries + 1}" if retries <= self.max_retries else "past --max-retries"
            attempt = f" (attempt {retries + 1} {of})"
        again = " (redelivered)" if delivery.redelivered else ""
        if returns > 1:
            again = f" (redelivered {returns} times)"
        if delivery.in_child and not self.in_process:
            again += " (in a child process)"
        priority = " (high priority)" if is_high_priority(delivery.properties) else ""
        late = ""
        if delivery.past.due is not None:  # a delayed task (new_task.py --delay), or a retry: when it was due
            due = workqueue.clock(delivery.past.due)
            late = time.time() - delivery.past.due
            late = f" (due {due}, {late:.1f}s late)" if late >= 0 else f" (due {due}, {-late:.1f}s early)"
        self.console.after(self.local.last, f"[x] Received '{delivery.label}'{priority}{attempt}{again}{late}", thread)
        self.local.last = delivery
        since = queued_since(delivery.properties, delivery.past.due)
        self.metrics.task_started(waited=None if since is None else max(0.0, time.time() - since))
        crashed = False
        if self.in_process or delivery.in_child:
            try:
                why, seconds, crashed = self.run_in_child(delivery.body)
            except ChildDidNotStart as error:  # not the task's fault: it goes back
                self.metrics.task_ran(0.0, delivery)
                if self.closing.is_set():  # killed by kill_children() as it started: the worker is exiting
                    return Result(Outcome.NOT_STARTED)
                return Result(Outcome.CANNOT_RUN, str(error), 0.0, thread)  # Worker.give_up() stops the worker
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
        self.metrics.task_ran(seconds, delivery)
        outcome = Outcome.CRASHED if crashed else Outcome.FAILED if why else Outcome.DONE
        return Result(outcome, why, seconds, thread)

    def run_in_child(self, body: bytes) -> tuple[str | None, float, bool]:
        """In this thread's child process (--isolation process), or, for a task that came back unacked, in
        one of its own, started for it and stopped after it: (why it failed, seconds, whether it died)."""
        if self.in_process:
            return self.local.child.run(body, self.time_limit)
        child = ChildProcess(self.make_task, self.spawning)
        self.children.append(child)  # for kill_children() at exit
        try:
            return child.run(body, None)
        finally:
            if child.process is not None:
                child.stop()
            self.children.remove(child)  # (atomic; kill_children() walks a copy)


class ChildDidNotStart(Exception):
    """A child process to run a task could not start (fork failed, the task's module did not load)."""


class CannotRunTasks(workqueue.WorkQueueError):
    """The worker cannot run any task: it takes none, and exits (a supervisor may start it again)."""

    exit_code = workqueue.EXIT_CANNOT_RUN_TASKS


def processes():
    """Child processes start from a fresh interpreter: no threads, sockets or locks of the worker in them.
    (multiprocessing is imported here: a worker of threads alone starts faster without it.)"""
    import multiprocessing  # noqa: PLC0415

    return multiprocessing.get_context("spawn")


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # the worker's to act on, never a child's


@dataclass(frozen=True)
class Spawning:
    """What a child's start checks: the worker is exiting (`closing`, set under `lock`) and spawns none."""

    closing: threading.Event
    lock: threading.Lock


class ChildProcess:
    """A child process that runs one task thread's tasks, one at a time, over a pipe.

    Python cannot stop a thread, but it can kill a process: at the time limit, or when a task
    killed its own process, the child is killed and reaped, the task counts as failed, and the
    next task starts a new child. Only the task thread that made it uses it.
    """

    def __init__(self, make_task: tuple[Callable, object], spawning: Spawning):
        self.make_task = make_task
        self.spawning = spawning
        self.process = None  # a multiprocessing Process, started by start()

    def start(self) -> str | None:
        """Start a child and wait until it has loaded the task (a time limit counts the task's time,
        not the start-up's). None once it is ready, else why it could not start (it is reaped)."""
        context = processes()
        self.pipe, child_end = context.Pipe()
        from workqueue.child_start import TaskProcess  # noqa: PLC0415  (with multiprocessing: only when needed)

        self.process = TaskProcess(target=child_main, args=(child_end, self.make_task), name="task", daemon=True)
        try:
            with self.spawning.lock:  # the spawn alone: kill_children() waits for it, never for a start-up
                if self.spawning.closing.is_set():
                    raise OSError("the worker is exiting")
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

    def run(self, body: bytes, time_limit: float | None) -> tuple[str | None, float, bool]:
        """Run one task in the child: (None if it was done, else why it failed; seconds it ran; whether
        the task killed the child: a crash, not a time limit)."""
        if self.process is None or not self.process.is_alive():  # the first task, or after a death
            if self.process is not None:
                self.stop()
            not_started = self.start()
            if not_started and not self.spawning.closing.is_set():  # once more: the reason may pass (no memory)
                time.sleep(1)
                not_started = self.start()
            if not_started:
                raise ChildDidNotStart(not_started)
        started = time.monotonic()
        why = None
        try:
            self.pipe.send_bytes(body)
            if self.pipe.poll(time_limit):  # time_limit None: wait as long as it takes
                return self.pipe.recv(), time.monotonic() - started, False  # None, or why; EOFError if it died
            why = f"time limit of {time_limit:g} s exceeded"
        except (EOFError, OSError):
            pass  # the child died under the task
        seconds = time.monotonic() - started
        self.process.kill()
        self.process.join()
        crashed = why is None
        why = why or died_how(self.process.exitcode)
        self.stop()  # TaskPool.serve starts the next one once this result is out
        return why, seconds, crashed


def died_how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = f" ({signal.Signals(-exitcode).name})"
        except ValueError:
            name = ""
        return f"killed by signal {-exitcode}{name}"
    return f"its process exited with code {exitcode}"


def child_main(pipe, make_task: tuple[Callable, object]) -> None:
    """In a child process: run each task the worker sends; answer None, or why it failed."""
    # Ctrl+C reaches the whole process group, and a service manager's stop (systemd's KillMode=control-group,
    # a container runtime) signals every process: the worker decides, and finishes the running task first.
    for signum in STOP_SIGNALS:  # a handler that does nothing, not SIG_IGN: a program the task starts gets
        signal.signal(signum, lambda *_: None)  # the default action back, and stops when told to
    die_with_the_worker()
    import multiprocessing  # noqa: PLC0415  (loaded already: it started us)

    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the worker died before we asked to die with it
        return
    function, argument = make_task
    task = function(argument)
    try:
        pipe.send("ready")
        while True:
            body = pipe.recv_bytes()
            try:
                task(body)
                pipe.send(None)
            except BaseException as error:
                pipe.send(reason(error))
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the worker is gone (kill -9): end quietly
        return


def die_with_the_worker() -> None:
    """Linux: get SIGKILL when the worker's thread that started us ends (say, kill -9 of the worker),
    rather than linger with a hung task. Elsewhere the child ends when its pipe closes."""
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def reason(error: BaseException | None) -> str:
    """What a failed task's error says, for its line and its x-error header."""
    return f"{type(error).__name__}: {error}"[:200]
