#!/usr/bin/env python
"""The tutorial's experiments, each run end to end with one command.

Each experiment starts the real worker.py and new_task.py as processes,
injects the faults itself (killing workers, restarting the broker, adding
workers) and shows what happened: a timeline (one row per worker), the queue
counts before and after, and a verdict in plain words.

    python exercises.py --list
    python exercises.py fair-dispatch
    python exercises.py --all --dot-seconds 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pika

import local_broker
import workqueue
from workqueue import policy

HERE = Path(__file__).resolve().parent


# --- Running the scripts --------------------------------------------------------------

PRINTING = threading.Lock()  # each worker's reader thread and the experiment print lines: whole, one at a time


def show(line: str) -> None:
    with PRINTING:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class Worker:
    """A worker.py process; each line it prints is kept with the time it arrived."""

    def __init__(self, lab: Lab, name: str, *args: str):
        self.lab = lab
        self.name = name
        self.events: list[tuple[float, str]] = []
        self.killed_at: float | None = None
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "worker.py"), "--name", name, "--url", lab.url, "--queue", lab.queue,
             "--dot-seconds", str(lab.dot_seconds), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            with self.changed:
                self.events.append((self.lab.now(), line))
                self.changed.notify_all()
            if self.lab.verbose:
                show(f"{self.lab.now():6.1f}s  {line}")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while sum(1 for _, line in self.events if re.search(pattern, line)) < count:
                if time.monotonic() > deadline or not self.reader.is_alive():
                    raise RuntimeError(f"{self.name}: no {pattern!r} within {timeout:.0f}s")
                self.changed.wait(0.1)

    def kill(self) -> None:
        """kill -9: no goodbye, no ack."""
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.killed_at = self.lab.now()

    def stop(self) -> None:
        """SIGTERM: a warm shutdown, the current task is finished first."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        self.reader.join(timeout=5)

    def spans(self) -> list[tuple[float, float | None, str, bool, str]]:
        """(start, end or None if never finished, task, redelivered, thread) for each task it started.

        A task thread prints Received as it starts a task, the connection's thread prints Done after the
        ack, so lines of tasks of several threads interleave. With --concurrency the lines name the thread
        (w1/2): each thread gets a row of its own in the timeline."""
        spans, running = [], {}
        for at, line in self.events:
            thread = line.split(" ", 1)[0]
            if m := re.search(r"\[x\] Received '([^']*)'(.*)", line):
                running[m[1]] = (at, "redelivered" in m[2], thread)
            elif (m := re.search(r"\[(?:x|!)\] (?:Done|Failed) '([^']*)'", line)) and m[1] in running:
                start, again, thread = running.pop(m[1])
                spans.append((start, at, m[1], again, thread))
        spans += [(start, None, task, again, thread) for task, (start, again, thread) in running.items()]
        return sorted(spans)

    def done(self) -> list[str]:
        return [m[1] for _, line in self.events if (m := re.search(r"\[x\] Done '([^']*)'", line))]


@dataclass
class Lab:
    """One experiment's broker, queue and workers."""

    url: str
    queue: str
    dot_seconds: float
    node: local_broker.BrokerNode | None
    verbose: bool = False
    started: float = field(default_factory=time.monotonic)
    workers: list[Worker] = field(default_factory=list)
    wait_queues: set[str] = field(default_factory=set)  # declared by its workers: removed with its queue
    sent: list[str] = field(default_factory=list)
    notes: list[tuple[float, str]] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started

    def note(self, text: str) -> None:
        self.notes.append((self.now(), text))
        if self.verbose:
            show(f"{self.now():6.1f}s  -- {text}")

    def worker(self, name: str, *args: str, wait: bool = True) -> Worker:
        delays = args[args.index("--retry-delays") + 1] if "--retry-delays" in args else policy.DEFAULT_RETRY_DELAYS
        self.wait_queues |= {workqueue.wait_queue(self.queue, float(d)) for d in delays.split(",") if float(d)}
        worker = Worker(self, name, *args)
        self.workers.append(worker)
        if wait:
            worker.wait_for("Waiting for messages")
        return worker

    def send(self, tasks: list[str], *args: str, queue: str | None = None) -> None:
        """Publish with new_task.py --file -, as a user would."""
        subprocess.run(
            [sys.executable, str(HERE / "new_task.py"), "--url", self.url, "--queue", queue or self.queue,
             "--file", "-", *args],
            input="\n".join(tasks), text=True, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        if queue is None:
            self.sent += tasks
        options = f" ({' '.join(args)})" if args else ""  # --delay 10, --priority high
        self.note(f"sent {workqueue.plural(len(tasks), 'task')}{options}" + (f" to {queue}" if queue else ""))

    def counts(self, queue: str | None = None) -> tuple[int, int] | None:
        """(messages_ready, messages_unacknowledged) of a queue, None if it does not exist."""
        queue = queue or self.queue
        if self.node:
            return self.node.queue_counts(queue)
        with pika.BlockingConnection(workqueue.connection_parameters(self.url)) as connection:
            try:  # without rabbitmqctl only the ready count is to be had
                return connection.channel().queue_declare(queue, passive=True).method.message_count, -1
            except pika.exceptions.ChannelClosedByBroker:
                return None

    def wait_until_done(self, tasks: list[str], timeout: float = 300) -> None:
        """Until every task was done by some worker still alive or not."""
        deadline = time.monotonic() + timeout
        while not set(tasks) <= {t for w in self.workers for t in w.done()}:
            if time.monotonic() > deadline:
                raise RuntimeError("not every task was done in time")
            time.sleep(0.05)

    def wait_until_idle(self, timeout: float = 300) -> None:
        """Until the living workers have nothing left to do and the queue holds nothing, ready or unacked.

        Between one task's Done and the next one's Received, a worker holds that next task delivered and
        unacked: the ready count alone is 0 then, and the task would be reported lost. With rabbitmqctl
        (a node of ours) the unacked count says so; without it, the workers must stay idle for a second."""
        deadline = time.monotonic() + timeout
        idle_since = None
        while True:
            busy = any(w.proc.poll() is None and any(s[1] is None for s in w.spans()) for w in self.workers)
            ready, unacked = self.counts() or (0, 0)
            if not busy and ready == 0 and unacked == 0:
                return
            if not busy and ready == 0 and unacked == -1:  # unknown: a Received would have shown by now
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= 1.0:
                    return
            else:
                idle_since = None
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not finish in time")
            time.sleep(0.1)

    def clean_up(self) -> None:
        """After the experiment: its workers killed, its queues gone."""
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait(timeout=10)
        self.delete_queues()

    def delete_queues(self, *queues: str) -> None:
        with pika.BlockingConnection(workqueue.connection_parameters(self.url)) as connection:
            channel = connection.channel()
            # The experiment's queue, its dead-letter queue and the wait queues its workers declared.
            for queue in queues or (self.queue, workqueue.dead_letter_queue(self.queue), *sorted(self.wait_queues)):
                channel.queue_delete(queue)  # a queue that is not there: nothing to do


# --- What happened -----------------------------------------------------------------


@dataclass
class Outcome:
    sent: int
    done: int  # distinct tasks done
    done_twice: int
    redelivered: int
    lost: int
    dead_lettered: int = 0
    still_queued: int = 0


def outcome(lab: Lab, still_queued: int = 0, dead_lettered: int = 0) -> Outcome:
    done = Counter(t for w in lab.workers for t in w.done())
    redelivered = sum(1 for w in lab.workers for s in w.spans() if s[3])
    distinct = len(set(lab.sent) & set(done))
    return Outcome(
        sent=len(lab.sent),
        done=distinct,
        done_twice=sum(1 for n in done.values() if n > 1),
        redelivered=redelivered,
        lost=len(lab.sent) - distinct - still_queued - dead_lettered,
        dead_lettered=dead_lettered,
        still_queued=still_queued,
    )


COLOURS = [31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96]


def use_colour() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM", "dumb") != "dumb" and "NO_COLOR" not in os.environ


def timeline(lab: Lab, width: int = 64) -> str:
    """A text Gantt chart: a row per worker, a letter per task (lower case: a redelivery),
    '?' a task cut off by a kill, 'X' where a worker was killed.

    It spans from the first task (or kill) to the last task's end (or kill), so tasks that all come
    late (after a broker restart) are not squeezed into the last cells, nor the experiment's last wait
    drawn. A task shorter than a cell takes one cell all the same, the next free one: a row of quick
    tasks is drawn a little late."""
    tasks = list(dict.fromkeys(lab.sent))
    letter = {t: chr(ord("A") + i % 26) for i, t in enumerate(tasks)}
    kills = [w.killed_at for w in lab.workers if w.killed_at is not None]
    all_spans = [span for worker in lab.workers for span in worker.spans()]
    starts = [span[0] for span in all_spans] + kills
    origin = min(starts, default=0.0)
    # ... to the last thing it shows (a task's end, a kill), not to now: the experiment's waits after it are empty
    end = max([*starts, *(span[1] for span in all_spans if span[1] is not None)], default=lab.now())
    if any(span[1] is None for span in all_spans) and not kills:
        end = lab.now()  # a task still running (cut off by nothing): up to now
    span_seconds = max(end - origin, 1e-9)

    def column(at: float) -> int:
        return min(max(int((at - origin) / span_seconds * (width - 1)), 0), width - 1)

    colour = use_colour()
    # A row per worker name (a worker started again under its name, as a service manager would, goes on in
    # the same row), or per thread of it with --concurrency: (span, the worker process it ran in), and kills.
    lanes: dict[str, tuple[list, list[float]]] = {}
    for worker in lab.workers:
        spans = worker.spans()
        for thread in sorted({span[4] for span in spans}) or [worker.name]:
            lane_spans, lane_kills = lanes.setdefault(thread, ([], []))
            lane_spans += [(span, worker) for span in spans if span[4] == thread]
            if worker.killed_at is not None:
                lane_kills.append(worker.killed_at)
    label_width = max([3, *map(len, lanes)])
    rows = []
    for thread, (lane_spans, lane_kills) in lanes.items():
        cells = [" "] * width
        free = 0  # the first cell not taken by an earlier task of this row
        for (start, stop, task, again, _), worker in sorted(lane_spans, key=lambda each: each[0][0]):
            first = min(max(column(start), free), width - 1)
            last = column(stop if stop is not None else worker.killed_at or end)
            free = max(last, first + 1)
            mark = letter.get(task, "?")
            mark = mark.lower() if again else mark
            for col in range(first, max(last, first + 1)):
                cell = mark if stop is not None else "?"
                if colour:
                    code = COLOURS[tasks.index(task) % len(COLOURS)] if task in tasks else 0
                    cell = f"\033[{code}m{cell}\033[0m"
                cells[col] = cell
        for killed_at in lane_kills:
            cells[column(killed_at)] = "X"
        rows.append(f"  {thread:>{label_width}} |{''.join(cells)}|")
    left, right = f"{origin:.1f}s", f"{end:.1f}s"  # under the first and the last cell
    ticks = f"  {'':>{label_width}}  {left}{'':{width - len(left) - len(right)}}{right}"
    legend = [f"{letter[t]}={t}" for t in tasks]
    legend_lines = ["  " + "  ".join(legend[i : i + 4]) for i in range(0, len(legend), 4)]
    legend_lines.append("  (lower case: redelivered; ?: cut off by its worker's death; X: the worker died)")
    return "\n".join([*rows, ticks, "", *legend_lines])


def show_counts(lab: Lab, when: str, queues: list[str] | None = None) -> None:
    show(f"\n  queues {when} (rabbitmqctl list_queues name messages_ready messages_unacknowledged):")
    for queue in queues or [lab.queue]:
        counts = lab.counts(queue)
        shown = "(no such queue)" if counts is None else "\t".join(str(c) if c >= 0 else "?" for c in counts)
        show(f"  {queue}\t{shown}")


# --- The experiments -------------------------------------------------------------------


def heavy_light(count: int) -> list[str]:
    """Even tasks heavy (5 dots), odd tasks light (1 dot), as the tutorial suggests."""
    return [f"task{i}{'.' * (5 if i % 2 == 0 else 1)}" for i in range(1, count + 1)]


def dispatch(lab: Lab, prefetch: int) -> tuple[Outcome, str]:
    workers = [lab.worker(f"w{n}", "--prefetch", str(prefetch)) for n in (1, 2)]
    tasks = heavy_light(8)
    lab.send(tasks)
    lab.wait_until_done(tasks)
    result = outcome(lab)
    dots = {w.name: sum(t.count(".") for t in w.done()) for w in workers}
    heavy = {w.name: sum(1 for t in w.done() if t.endswith(".....")) for w in workers}
    makespan = max(s[1] for w in workers for s in w.spans() if s[1]) - min(s[0] for w in workers for s in w.spans())
    loads = ", ".join(f"{name} did {heavy[name]} heavy tasks ({dots[name]} dots of work)" for name in dots)
    if prefetch == 0:
        why = "round-robin deals task 1, 3, 5, ... to one worker and 2, 4, 6, ... to the other, whatever their weight"
    else:
        why = "with prefetch 1 a worker gets a new task only when it acked the last, so the free worker takes it"
    return result, f"{loads}; all done in {makespan:.1f}s. {why[0].upper() + why[1:]}."


def round_robin(lab: Lab) -> tuple[Outcome, str]:
    """prefetch 0, even tasks heavy, odd light: one worker gets every heavy task."""
    return dispatch(lab, prefetch=0)


def fair_dispatch(lab: Lab) -> tuple[Outcome, str]:
    """The same tasks with prefetch 1: the heavy tasks spread over both workers."""
    return dispatch(lab, prefetch=1)


def kill_two_of_three(lab: Lab, *worker_args: str) -> Outcome:
    workers = [lab.worker(f"w{n}", *worker_args) for n in (1, 2, 3)]
    tasks = [f"task{i}{'.' * 3}" for i in range(1, 13)]
    lab.send(tasks)
    for victim in workers[:2]:
        victim.wait_for(r"Received", count=2)
    for victim in workers[:2]:
        victim.kill()
        lab.note(f"killed {victim.name} (kill -9)")
    lab.wait_until_idle()
    return outcome(lab, still_queued=(lab.counts() or (0, 0))[0])


def auto_ack_loses(lab: Lab) -> tuple[Outcome, str]:
    """--auto-ack, 3 workers, kill 2 of them mid-task: their tasks are gone."""
    result = kill_two_of_three(lab, "--auto-ack")
    return result, (
        f"{result.lost} of {result.sent} tasks lost: with auto-ack the broker forgets a task the moment it "
        "delivers it, and pushes all it can (prefetch does not apply), so the killed workers took their "
        "tasks, and everything already pushed to them, with them."
    )


def manual_ack_redelivers(lab: Lab) -> tuple[Outcome, str]:
    """Manual acks, 3 workers, kill 2 of them mid-task: their tasks go to the survivor."""
    result = kill_two_of_three(lab)
    return result, (
        f"{workqueue.plural(result.lost, 'task')} lost, {result.redelivered} redelivered: a task is acked only "
        "when done, so the "
        "broker gave the killed workers' unacked tasks to the worker still running (marked lower case)."
    )


def broker_restart(lab: Lab) -> tuple[Outcome, str]:
    """Tasks waiting in a classic queue (transient messages) and a quorum queue (persistent) over a restart."""
    if lab.node is None:
        raise workqueue.UsageError(
            "broker-restart restarts the broker: run it on a throwaway node (without --url or --local)"
        )
    classic = lab.queue + "_classic"
    tasks = [f"task{i}." for i in range(1, 7)]
    lab.send(tasks)
    lab.send(tasks, "--queue-type", "classic", "--transient", queue=classic)
    wait_for(lambda: lab.counts() == (6, 0) and lab.counts(classic) == (6, 0), "the counts to settle")
    show_counts(lab, "before the restart", [lab.queue, classic])
    lab.note("stopping the broker")
    lab.node.restart()
    lab.note("broker started again")
    # rabbitmqctl reads 0 for a quorum queue until its Raft member has recovered its log: give it a moment.
    try:
        wait_for(lambda: lab.counts() not in (None, (0, 0)), "the quorum queue's counts", timeout=15)
    except RuntimeError:
        pass  # show what rabbitmqctl says, 0 included
    show_counts(lab, "after the restart", [lab.queue, classic])
    classic_left = (lab.counts(classic) or (0, 0))[0]
    worker = lab.worker("w1")
    lab.wait_until_done(tasks)
    worker.stop()
    lab.delete_queues(classic)
    result = outcome(lab)
    return result, (
        f"Quorum queue, persistent tasks: {result.done} of {len(tasks)} survived the restart and were done. "
        f"Classic queue, transient tasks: {len(tasks) - classic_left} of {len(tasks)} lost: a durable queue "
        "keeps only messages published persistent."
    )


def poison(lab: Lab) -> tuple[Outcome, str]:
    """A task that always fails: retried, then moved to the dead-letter queue; the rest keep flowing."""
    lab.worker("w1", "--max-retries", "2", "--retry-delays", "0")
    lab.worker("w2", "--max-retries", "2", "--retry-delays", "0")
    tasks = ["task1..", "an error.", "task3.", "task4..", "task5."]
    lab.send(tasks)
    lab.wait_until_done([t for t in tasks if "error" not in t])
    dlq, result = one_dead_letter(lab)
    failures = sum(1 for w in lab.workers for _, line in w.events if "Failed 'an error.'" in line)
    return result, (
        f"'an error.' failed {failures} times (the first try and 2 retries, each at the back of the queue) "
        f"and was moved to {dlq}; the other {result.done} tasks were done meanwhile. Nothing lost."
    )


def scale_out(lab: Lab) -> tuple[Outcome, str]:
    """One worker, then two more join while tasks run, then one leaves (SIGTERM: warm shutdown)."""
    first = lab.worker("w1")
    tasks = [f"task{i}.." for i in range(1, 16)]
    lab.send(tasks[:4])
    first.wait_for(r"Done", count=2)
    lab.note("adding w2 and w3")
    lab.worker("w2")
    third = lab.worker("w3")
    # The rest once all three are waiting: started at once, w1 could empty the queue while they start.
    lab.send(tasks[4:])
    third.wait_for(r"Done", count=2)
    lab.note("stopping w3 (SIGTERM)")
    third.stop()
    lab.wait_until_done(tasks)
    result = outcome(lab)
    per_worker = ", ".join(f"{w.name} {len(w.done())}" for w in lab.workers)
    handed_back = sum(1 for _, line in third.events if "Handed back" in line)
    lines = [line for _, line in third.events]
    signalled = next((i for i, line in enumerate(lines) if "Warm shutdown" in line), len(lines))
    started_late = sum(1 for line in lines[signalled:] if "Received" in line)
    after_signal = (
        "started nothing after the signal"
        if not started_late
        else f"started {workqueue.plural(started_late, 'task')} after the signal"
    ) + (
        f" and handed back {workqueue.plural(handed_back, 'task')} it received after it, untouched "
        "(another worker did them, "
        "marked lower case)"
        if handed_back
        else ""
    )
    unfinished = sum(1 for span in third.spans() if span[1] is None)
    return result, (
        f"Tasks done per worker: {per_worker}. New workers took tasks as soon as they joined; w3 finished "
        f"{'its running task' if not unfinished else 'NOT its running task'}, {after_signal}. "
        f"{result.lost} lost, {result.redelivered} redelivered."
    )


def concurrency(lab: Lab) -> tuple[Outcome, str]:
    """One worker, --concurrency 4: tasks that wait (I/O-bound) run four at once."""
    worker = lab.worker("w1", "--concurrency", "4")
    tasks = [f"task{i}..." for i in range(1, 13)]
    lab.send(tasks)
    lab.wait_until_done(tasks)
    result = outcome(lab)
    spans = worker.spans()
    took = max(s[1] for s in spans if s[1]) - min(s[0] for s in spans)
    work = sum(s[1] - s[0] for s in spans if s[1])
    most = max(sum(1 for s in spans if s[0] <= t[0] < (s[1] or t[0] + 1)) for t in spans)
    threads = len({s[4] for s in spans})
    return result, (
        f"{result.done} tasks, {work:.1f}s of work, done in {took:.1f}s by one process: up to {most} at once, "
        f"on {threads} threads (a row each). The broker gave it 4 unacked tasks at a time (prefetch follows "
        "--concurrency), and each was acked on its own as it finished."
    )


def one_dead_letter(lab: Lab) -> tuple[str, Outcome]:
    """Wait for the one dead task in the dead-letter queue, show both queues: (its name, the outcome)."""
    dlq = workqueue.dead_letter_queue(lab.queue)
    wait_for(lambda: (lab.counts(dlq) or (0, 0))[0] == 1, "the dead-letter queue")
    show_counts(lab, "after", [lab.queue, dlq])
    return dlq, outcome(lab, dead_lettered=1)


def hung_task(lab: Lab) -> tuple[Outcome, str]:
    """A task that never returns, under --time-limit: stopped, retried, dead-lettered; the rest go on."""
    limit = round(lab.dot_seconds * 5, 3)
    lab.worker("w1", "--time-limit", str(limit), "--max-retries", "1", "--retry-delays", "0")
    tasks = ["task1..", "hang", "task3..", "task4.."]
    lab.send(tasks)
    lab.wait_until_done([t for t in tasks if t != "hang"])
    dlq, result = one_dead_letter(lab)
    stopped = sum(1 for w in lab.workers for _, line in w.events if "Failed 'hang': time limit" in line)
    return result, (
        f"'hang' was stopped at the time limit of {limit:g} s {stopped} times (the first try and 1 retry): its "
        f"child process was killed and replaced, and the task moved to {dlq}. The other {result.done} tasks "
        "were done. Without --time-limit the worker would wait for it forever."
    )


def crash_loop(lab: Lab) -> tuple[Outcome, str]:
    """A task that kills its worker, with workers restarted as a service manager would: bounded."""
    tasks = ["task1.", "crash", "task3.", "task4."]
    lab.send(tasks)
    deaths = 0
    for run in range(1, 7):
        worker = lab.worker(f"w1#{run}", "--max-retries", "2", "--retry-delays", "0")
        wait_for(
            lambda: worker.proc.poll() is not None or set(tasks) - {"crash"} <= set(lab_done(lab)),  # noqa: B023
            "the worker to die or finish",
        )
        if worker.proc.poll() is None:
            break
        worker.killed_at = lab.now()
        deaths += 1
        lab.note(f"{worker.name} died ({died_how(worker.proc.returncode)}); restarting it")
    dlq, result = one_dead_letter(lab)
    return result, (
        f"'crash' killed the worker running it {workqueue.plural(deaths, 'time')}. It came back unacked, so "
        "the next worker ran it in a child process of its own (a task that comes back may have killed its "
        f"worker, or not): there it killed only the child, failed like any task, was retried and went to {dlq}; "
        f"the other {result.done} tasks were done. Unbounded, a service manager would restart workers into the "
        "same task forever (and RabbitMQ 4 would drop it at its 21st return, without a word)."
    )


def lab_done(lab: Lab) -> list[str]:
    return [t for w in lab.workers for t in w.done()]


def died_how(returncode: int | None) -> str:
    return f"killed by signal {-returncode}" if returncode and returncode < 0 else f"exit {returncode}"


def retry_backoff(lab: Lab) -> tuple[Outcome, str]:
    """A failing task retried after growing delays, in wait queues, while the other tasks flow."""
    delays = [round(lab.dot_seconds * 5, 3), round(lab.dot_seconds * 10, 3)]
    worker = lab.worker("w1", "--max-retries", "3", "--retry-delays", ",".join(f"{d:g}" for d in delays))
    tasks = ["an error", "task2.", "task3.", "task4."]
    lab.send(tasks)
    lab.wait_until_done(tasks[1:])
    dlq, result = one_dead_letter(lab)
    events = [(at, line) for at, line in worker.events if "'an error'" in line]
    gaps, failed_at = [], None
    for at, line in events:
        if "Failed" in line:
            failed_at = at
        elif "Received" in line and failed_at is not None:
            gaps.append(at - failed_at)
    # By the worker's own clock, each retry's start against the due time its failure set (x-due-at): the line
    # times above are when this process read them, which a loaded machine can skew by a few tenths.
    late = [
        float(m[1]) * (1 if m[2] == "late" else -1)
        for _, line in events
        if (m := re.search(r"Received 'an error'.*\(due [\d:]+, ([\d.]+)s (late|early)\)", line))
    ]
    planned = ", ".join(f"{d:g}s" for d in [*delays, delays[-1]])
    waited = ", ".join(f"{g:.1f}s" for g in gaps)
    return result, (
        f"'an error' was tried 4 times; it waited {waited} between tries (asked: {planned}, the last delay "
        f"repeating; each try started {', '.join(f'{s:+.1f}s' for s in late)} from its due time, by the worker's "
        f"clock), each wait in a queue of its own ({lab.queue}.retry.<delay>s) with no worker holding it, "
        f"then it moved to {dlq}. The other {result.done} tasks were done meanwhile."
    )


def delay(lab: Lab) -> tuple[Outcome, str]:
    """Tasks for later: each waits in the broker, not in a worker, and starts at its due time."""
    plan = {"remind in 5s": 5, "remind in 10s": 10, "remind in 15s": 15}
    delay_queues = [workqueue.delay_queue(lab.queue, seconds) for seconds in plan.values()]
    lab.wait_queues |= set(delay_queues)  # removed with the experiment's queue
    worker = lab.worker("w1")
    for task, seconds in plan.items():
        lab.send([task], "--delay", str(seconds))
    held = lab.counts()  # w1 is running: it holds none of them
    lab.note("stopping w1 while the tasks wait")
    worker.stop()
    show_counts(lab, "while they wait, no worker running", [lab.queue, *delay_queues])
    wait_for(lambda: (lab.counts() or (0, 0))[0] >= 1, "the first task to come due", timeout=30)
    lab.note("a task came due with no worker running: starting w1 again")
    lab.worker("w1")
    lab.wait_until_done(list(plan))
    late = {
        m[1]: float(m[2])
        for w in lab.workers
        for _, line in w.events
        if (m := re.search(r"Received '([^']*)'.*\(due [\d:]+, ([\d.]+)s late\)", line))
    }
    result = outcome(lab)
    starts = ", ".join(f"'{task}' {late.get(task, float('nan')):.1f}s" for task in plan)
    unacked = (
        f"{lab.queue}: {held[1]} unacked"
        if held and held[1] >= 0
        else "without rabbitmqctl the unacked count is not to be had"
    )
    return result, (
        f"{result.done} of {len(plan)} tasks done, each after its due time: {starts} late (the first came due "
        f"while no worker ran, and waited in {lab.queue} for w1). While they waited no worker held them "
        f"({unacked}; each waited in {lab.queue}.delay.<S>s, whose TTL moved it to {lab.queue} at its time), so "
        "stopping w1 lost nothing."
    )


def priority(lab: Lab) -> tuple[Outcome, str]:
    """Urgent tasks overtake a backlog: RabbitMQ 4's quorum queues take high-priority tasks first."""
    with pika.BlockingConnection(workqueue.connection_parameters(lab.url)) as connection:
        version = workqueue.broker_version(connection)
    if version < (4,):
        refused = subprocess.run(
            [sys.executable, str(HERE / "new_task.py"), "--url", lab.url, "--queue", lab.queue, "--priority", "high",
             "urgent"], check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        print(f"  new_task.py --priority high: exit {refused.returncode}: {refused.stderr.strip()}")
        return outcome(lab), (
            f"RabbitMQ {'.'.join(map(str, version))}'s quorum queues ignore priorities, so new_task.py refuses "
            f"--priority high there (exit {refused.returncode}) rather than send one that nothing reads. To see it "
            "work, start RabbitMQ 4 (./run.sh broker 4.3 prints its URL) and run exercises.py priority --url URL."
        )
    worker = lab.worker("w1")
    busy = "busy" + "." * max(5, round(2 / max(lab.dot_seconds, 0.01)))  # 2 s at least: the backlog builds meanwhile
    lab.send([busy])
    worker.wait_for(r"Received 'busy")
    backlog = [f"backlog {n}." for n in range(1, 7)]
    urgent = ["URGENT 1.", "URGENT 2."]
    lab.send(backlog)
    lab.send(urgent, "--priority", "high")
    in_time = busy not in worker.done()  # all waiting before w1 was free, or the experiment shows nothing
    lab.wait_until_done([*backlog, *urgent, busy])
    order = [task for _, _, task, _, _ in sorted(worker.spans()) if task != busy]
    places = " and ".join(str(order.index(task) + 1) for task in urgent)
    late = "" if in_time else " (but w1 was free before they were all sent: try a larger --dot-seconds)"
    return outcome(lab), (
        f"The {len(urgent)} urgent tasks, sent after {len(backlog)} waiting ones, started {places} of "
        f"{len(order)} once w1 was free{late} (a quorum queue serves high and normal about 2:1, so a backlog "
        "still moves)."
    )


DEMO_TASKS = [
    "Send welcome e-mail.", "Resize photo......", "Make thumbnail..", "Render report..........", "Ping.",
    "Transcode video........", "Send invoice...", "Index document.", "Crop avatar....",
    "Backup database............", "Notify user.", "Compress logs.....",
]  # fmt: skip


def demo(lab: Lab) -> tuple[Outcome, str]:
    """3 workers, a dozen tasks of mixed weight: who did what, and when."""
    for n in (1, 2, 3):
        lab.worker(f"w{n}")
    lab.send(DEMO_TASKS)
    lab.wait_until_done(DEMO_TASKS)
    result = outcome(lab)
    return result, (
        f"{result.done} tasks done by 3 workers. With prefetch 1 each worker takes a new task only when it "
        "finished the last, so the heavy tasks did not pile up on one worker."
    )


EXPERIMENTS: dict[str, Callable[[Lab], tuple[Outcome, str]]] = {
    "round-robin": round_robin,
    "fair-dispatch": fair_dispatch,
    "auto-ack-loses": auto_ack_loses,
    "manual-ack-redelivers": manual_ack_redelivers,
    "broker-restart": broker_restart,
    "poison": poison,
    "scale-out": scale_out,
    "concurrency": concurrency,
    "hung-task": hung_task,
    "crash-loop": crash_loop,
    "retry-backoff": retry_backoff,
    "delay": delay,
    "priority": priority,
    "demo": demo,
}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


# --- Command line -----------------------------------------------------------------------


def make_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        epilog="examples:\n  python exercises.py --list\n  python exercises.py auto-ack-loses\n"
        "  python exercises.py --all --dot-seconds 0.1\n  python exercises.py --rabbitmq 4.3 delay   # on a 4.3 node",
        formatter_class=workqueue.HelpFormatter,
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="experiments to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the experiments, one line each")
    parser.add_argument("--all", action="store_true", help="run every experiment but the demo")
    parser.add_argument(
        "--dot-seconds", type=workqueue.non_negative(float), default=0.2, metavar="S", help="seconds of work per dot"
    )
    parser.add_argument("--url", help="use this broker (a queue of its own, removed after) instead of a throwaway node")
    parser.add_argument(
        "--local",
        action="store_true",
        help="use the broker on $AMQP_URL or localhost if one answers, else a throwaway node",
    )
    parser.add_argument(
        "--rabbitmq",
        choices=local_broker.RELEASES,
        help="the release of the throwaway node: system, 4.0 or 4.3 (default: $WORKQUEUE_RABBITMQ, else system; "
        "./run.sh broker R installs it)",
    )
    parser.add_argument("--quiet", action="store_true", help="no live output, only timeline and verdict")
    parser.add_argument("--json", action="store_true", help="print each outcome as a JSON line too (for tests)")
    return parser


NEEDS_A_THROWAWAY_NODE = ("broker-restart",)


def local_url() -> str | None:
    url = workqueue.broker_urls(None)[0]
    parts = urlsplit(url)
    return url if local_broker.amqp_answers(parts.hostname or "localhost", parts.port or 5672) else None


def main() -> int:
    args = make_argument_parser().parse_args()
    if args.list:
        for name, experiment in EXPERIMENTS.items():
            print(f"  {name:<22} {experiment.__doc__.splitlines()[0]}")
        # Not an experiment here: it stops and kills brokers, so it starts nodes of its own.
        print(f"  {'chaos':<22} Every fault at once, and a ledger of every task: ./run.sh chaos (chaos.py --help)")
        return 0
    names = [n for n in EXPERIMENTS if n != "demo"] if args.all else args.names
    unknown = [n for n in names if n not in EXPERIMENTS]
    if not names or unknown:
        raise workqueue.UsageError(
            f"unknown experiment {unknown[0]!r}; see --list" if unknown else "name an experiment, or --all; see --list"
        )

    url = args.url or (local_url() if args.local else None)
    if url and args.all:  # a broker of yours is never restarted: --all runs every other experiment
        names = [name for name in names if name not in NEEDS_A_THROWAWAY_NODE]
        skipped = ", ".join(NEEDS_A_THROWAWAY_NODE)
        only = "so it runs only on a throwaway node (without --url or --local)"
        print(f"Skipping {skipped}: it restarts the broker, {only}")
    elif url and set(names) & set(NEEDS_A_THROWAWAY_NODE):  # refused before anything is printed or started
        raise workqueue.UsageError(
            "broker-restart restarts the broker: run it on a throwaway node (without --url or --local)"
        )
    node = None
    if url is None:
        if os.environ.get("AMQP_URL") and not args.local:
            print("AMQP_URL is set, but the experiments run on a throwaway node of their own (--local uses it)")
        rabbitmq = local_broker.RabbitMQ(args.rabbitmq)  # --rabbitmq, else $WORKQUEUE_RABBITMQ, else the system's
        print(f"Starting a throwaway RabbitMQ {rabbitmq.version()} node (about 10 s)...", flush=True)
        node = local_broker.BrokerNode(name="exercise", rabbitmq=rabbitmq).start()
        url = node.url
    else:
        print(f"Using the broker at {workqueue.redact(url)}")
    try:
        for name in names:
            lab = Lab(url=url, queue=f"ex_{name.replace('-', '_')}_{os.getpid()}", dot_seconds=args.dot_seconds,
                      node=node, verbose=not args.quiet)  # fmt: skip
            show(f"\n=== {name}: {EXPERIMENTS[name].__doc__.splitlines()[0]}\n")
            try:
                result, verdict = EXPERIMENTS[name](lab)
                show("\n  timeline:\n" + timeline(lab))
                if name not in ("broker-restart", "poison", "hung-task", "crash-loop", "retry-backoff", "priority"):
                    show_counts(lab, "after")
                show(f"\n  verdict: {verdict}\n")
                if args.json:
                    show(json.dumps({"experiment": name, **result.__dict__}))
            finally:
                lab.clean_up()
    finally:
        if node:
            node.destroy()
    return 0


if __name__ == "__main__":
    workqueue.run(main)
