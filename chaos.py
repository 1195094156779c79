#!/usr/bin/env python
"""Chaos with a ledger: a live work queue under random faults, and an account of every task.

A producer streams tasks through a pipe into new_task.py (confirms on); four workers with
different settings take them, each started again when it stops, as a supervisor would. A seeded
schedule of faults hits them and the broker meanwhile. Every task runs chaos:run, which notes
each start and end in a ledger file. At the end the ledger is checked against what must hold:

- no confirmed task lost: each one ended, or is in the dead-letter queue;
- in the dead-letter queue exactly the tasks meant to fail or crash (and hangs that ran into a
  time limit), each with the reason it should have;
- no task dead-lettered without having run;
- every warm stop ended once its running tasks could, every cold stop in seconds;
- the queues empty at the end, and the producer's exit 0.
A task that ran twice (a fault between its end and its ack) is counted and listed, not hidden.

    python chaos.py                         # a minute on a throwaway node, a random seed
    python chaos.py --seed 7 --seconds 300  # the same seed, the same schedule of faults
    python chaos.py --cluster               # three nodes; nodes are killed and brought back
    python chaos.py --max-retries 0         # the crash-loop guard at its tightest
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pika

import local_broker
import workqueue

HERE = Path(__file__).resolve().parent
QUEUE = "chaos"
DOT_SECONDS = 0.1  # a task is 0-3 dots
TIME_LIMIT = 2.0  # w3's --time-limit
HANG_SECONDS = 6.0  # a hanging task: past w3's time limit; the other workers sit it out
HEARTBEAT = 5  # seconds: a silently cut connection is noticed in two to three of them
WARM_STOP_BOUND = 30.0  # a hang (6 s), a retry held by a memory alarm (6 s), and a loaded machine
COLD_STOP_BOUND = 10.0
STOP_BOUNDS = {"kill -9": COLD_STOP_BOUND, "warm stop": WARM_STOP_BOUND, "cold stop": COLD_STOP_BOUND}
RESTART_PAUSE = 0.5  # seconds before a stopped worker is started again (systemd's RestartSec)

# What each task does, and how often: most are ordinary; the rest are faults of the task's own.
KINDS = {"ok": 94, "fail": 3, "crash": 1.5, "hang": 1.5}
# Why each kind may end in the dead-letter queue (a part of the x-error the worker writes).
REASONS = {
    "fail": ("meant to fail",),
    "crash": ("killed by signal 9",),  # the child running it (after it killed a worker once, it runs in one)
    "hang": ("time limit",),  # on w3; the other workers let it end
}
# The workers: one of each kind of set-up a deployment has.
WORKERS = {
    "w1": ("--prefetch", "1"),
    "w2": ("--concurrency", "3", "--prefetch", "6"),
    "w3": ("--isolation", "process", "--time-limit", f"{TIME_LIMIT:g}"),
    "w4": ("--max-tasks", "5", "--prefetch", "3"),  # recycled: it exits after 5 tasks and is started again
}
# The faults, and their weights. A worker's: kill -9, Ctrl+C (warm), Ctrl+C twice (cold), its
# connection reset or silently dropped (through its proxy). The broker's: a restart, a kill -9,
# each down for a few seconds (with --cluster: one node), and a memory alarm that blocks publishers.
FAULTS = {
    "kill -9": 3,
    "warm stop": 2,
    "cold stop": 1,
    "connection reset": 2,
    "silent connection": 1,
    "broker restart": 1,
    "broker kill -9": 1,
    "memory alarm": 1,
}
WORKER_FAULTS = {"kill -9", "warm stop", "cold stop", "connection reset", "silent connection"}
MEAN_FAULT_GAP = 4.0  # seconds


# --- The task every worker runs -------------------------------------------------------------

_ledger_fd: int | None = None


def run(body: bytes) -> None:
    """The chaos task (worker.py --task chaos:run): `<id> <kind> [dots]`, noted in $CHAOS_LEDGER."""
    task_id, kind, *dots = body.decode().split()
    note(f"start {task_id} {os.environ.get('CHAOS_WORKER', '?')}")
    if kind == "fail":
        raise RuntimeError("meant to fail")
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)  # the worker (or, with --isolation process, its child)
    time.sleep(HANG_SECONDS if kind == "hang" else len("".join(dots)) * DOT_SECONDS)
    note(f"end {task_id}")


def note(line: str) -> None:
    """One line in the ledger: a single O_APPEND write, whole even beside other processes' writes."""
    global _ledger_fd
    if "CHAOS_LEDGER" not in os.environ:
        return
    if _ledger_fd is None:
        _ledger_fd = os.open(os.environ["CHAOS_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_ledger_fd, f"{line}\n".encode())


# --- The plan: the same seed, the same tasks and the same faults ----------------------------


class Fault(NamedTuple):
    at: float  # seconds after the start
    kind: str
    target: str  # a worker's name, or a node's number
    hold: float  # seconds a node stays down, or an alarm lasts


def plan_faults(seed: int, seconds: float, nodes: int) -> list[Fault]:
    rng = random.Random(f"faults {seed}")
    faults, at = [], rng.uniform(2, 5)
    while at < seconds - 3:
        kind = rng.choices(list(FAULTS), weights=list(FAULTS.values()))[0]
        target = rng.choice(list(WORKERS)) if kind in WORKER_FAULTS else str(rng.randrange(nodes))
        faults.append(Fault(round(at, 1), kind, target, round(rng.uniform(1, 6), 1)))
        at += rng.expovariate(1 / MEAN_FAULT_GAP)
    return faults


def plan_tasks(seed: int, count: int) -> list[str]:
    """`count` task bodies: `t000001 ok ..`."""
    rng = random.Random(f"tasks {seed}")
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=count)
    return [f"t{n:06d} {kind} {'.' * rng.randrange(4)}".rstrip() for n, kind in enumerate(kinds, 1)]


# --- The ledger, and what must hold ---------------------------------------------------------


@dataclass
class Ledger:
    """What became of every task: read from the ledger file, the dead-letter queue and the run."""

    sent: dict[str, str] = field(default_factory=dict)  # id -> kind, for every line the producer took
    starts: Counter = field(default_factory=Counter)  # id -> runs begun
    ends: Counter = field(default_factory=Counter)  # id -> runs that ended (its ack was then sent)
    dead: dict[str, list[str]] = field(default_factory=dict)  # id -> the x-error of each of its dead letters
    faults: int = 0
    left: int = 0  # tasks still in the queues at the end
    producer_exit: int | None = 0
    overruns: list[str] = field(default_factory=list)  # stops that took longer than their bound
    bad_exits: list[str] = field(default_factory=list)  # workers that exited as they never should

    def read_notes(self, text: str) -> None:
        for line in text.splitlines():
            what, task_id, *_ = [*line.split(), "", ""]
            if what == "start":
                self.starts[task_id] += 1
            elif what == "end":
                self.ends[task_id] += 1


def as_meant(kind: str, reasons: list[str]) -> bool:
    """Whether every dead letter of a task of this kind says a reason it may have."""
    return all(any(part in why for part in REASONS.get(kind, ())) for why in reasons)


def check(ledger: Ledger) -> tuple[str, list[str]]:
    """The ledger's line, and each invariant that does not hold (with the tasks involved)."""
    lost = [t for t in ledger.sent if not ledger.ends[t] and t not in ledger.dead]
    unexpected, missing = [], []
    for task_id, kind in ledger.sent.items():
        reasons = ledger.dead.get(task_id)
        if reasons and not as_meant(kind, reasons):
            unexpected.append(f"{task_id} ({kind}, ran {ledger.starts[task_id]}x: {reasons[0]})")
        if kind in ("fail", "crash") and not reasons and task_id not in lost:
            missing.append(f"{task_id} ({kind}, ran {ledger.starts[task_id]}x, ended {ledger.ends[task_id]}x)")
    unrun = [t for t in ledger.dead if not ledger.starts[t]]
    strangers = [t for t in ledger.dead if t not in ledger.sent]
    expected = sum(1 for t, reasons in ledger.dead.items() if t in ledger.sent and as_meant(ledger.sent[t], reasons))
    duplicates = [f"{t} ran {n}x" for t, n in ledger.ends.items() if n > 1]
    duplicates += [f"{t} dead-lettered {len(r)}x" for t, r in ledger.dead.items() if len(r) > 1]
    line = (
        f"ledger: {len(ledger.sent)} tasks, {ledger.faults} faults, lost {len(lost)}, "
        f"dead-lettered {len(ledger.dead)} ({expected} expected), ran unrun {len(unrun)}, "
        f"duplicates {len(duplicates)}"
    )
    if duplicates:
        line += " (" + ", ".join(duplicates[:5]) + (" ..." if len(duplicates) > 5 else "") + ")"
    broken = []
    for what, items in (
        ("lost: confirmed, never ended, not in the dead-letter queue", lost),
        ("dead-lettered without having run", unrun),
        ("dead-lettered, not meant to be (or not for that reason)", unexpected),
        ("meant to fail or crash, yet not in the dead-letter queue", missing),
        ("in the dead-letter queue, never sent", strangers),
        ("a stop overran its bound", ledger.overruns),
        ("a worker exited as it never should", ledger.bad_exits),
    ):
        if items:
            shown = ", ".join(items[:10]) + (f" and {len(items) - 10} more" if len(items) > 10 else "")
            broken.append(f"{what}: {len(items)}: {shown}")
    if ledger.left:
        broken.append(f"the queues still held {ledger.left} tasks at the end")
    if ledger.producer_exit != 0:
        broken.append(f"the producer exited with code {ledger.producer_exit}")
    return line, broken


# --- The run --------------------------------------------------------------------------------


class Timeline:
    """Lines of what happened, each with its time since the start (any thread may add one)."""

    def __init__(self):
        self.began = time.monotonic()
        self.lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.began

    def say(self, text: str) -> None:
        with self.lock:
            print(f"{self.now():7.1f} s  {text}", flush=True)


class Supervised:
    """One worker.py, started again whenever it stops (as systemd's Restart=always would).

    Its thread owns the process; the fault thread only signals it, after noting in `stopping` (under
    `lock`) what it asked for, so that the supervisor judges the exit against the right bound. What
    it finds goes into the ledger's lists (an append is atomic), read only once every thread ended."""

    def __init__(self, chaos: Chaos, name: str, settings: tuple[str, ...], urls: list[str]):
        self.chaos, self.name, self.settings, self.urls = chaos, name, settings, urls
        self.lock = threading.Lock()
        self.process: subprocess.Popen | None = None
        self.log_size = 0  # the log's size when the process started: it has said nothing while it is so
        self.stopping: tuple[str, float, float] | None = None  # (what, when, bound)
        self.recycled = 0
        self.log = open(chaos.logs / f"{name}.log", "ab")  # noqa: SIM115 (open as long as the worker runs)
        self.thread = threading.Thread(target=self.supervise, name=name, daemon=True)

    def start_process(self) -> subprocess.Popen:
        urls = [arg for url in self.urls for arg in ("--url", url)]
        return subprocess.Popen(
            [sys.executable, str(HERE / "worker.py"), "--name", self.name, "--queue", QUEUE, "--task", "chaos:run",
             "--max-retries", str(self.chaos.max_retries), "--retry-delays", "1", "--connect-timeout", "300",
             *urls, *self.settings],
            cwd=HERE, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            env={**os.environ, "CHAOS_LEDGER": str(self.chaos.ledger_file), "CHAOS_WORKER": self.name,
                 "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # a Ctrl+C at the terminal reaches chaos.py alone, which stops them in turn
        )  # fmt: skip

    def supervise(self) -> None:
        while True:
            with self.lock:
                if self.chaos.ending.is_set():
                    return
                self.process = self.start_process()
                self.log_size = os.path.getsize(self.log.name)
            self.wait()
            if self.chaos.ending.is_set():
                return
            time.sleep(RESTART_PAUSE)

    def wait(self) -> None:
        """Until the process exits, holding any stop asked of it to its bound; then judge its exit."""
        overran = False
        while True:
            with self.lock:
                stopping = self.stopping
            timeout = 0.5
            if stopping and not overran:
                timeout = max(0.0, stopping[1] + stopping[2] - time.monotonic())
            try:
                code = self.process.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                if stopping and not overran:  # once: then wait for the kill to land
                    overran = True
                    what, _, bound = stopping
                    self.chaos.ledger.overruns.append(f"{self.name}'s {what} ran past {bound:g} s")
                    self.chaos.timeline.say(f"{self.name}: {what} still running after {bound:g} s: kill -9")
                    self.process.kill()
        with self.lock:
            stopping, self.stopping = self.stopping, None
        if stopping:
            what, began, _ = stopping
            self.chaos.timeline.say(f"{self.name}: {what} done, exit {code}, in {time.monotonic() - began:.1f} s")
            # A cold stop's first Ctrl+C may end an idle worker before the second comes (0), or the second
            # may land while Python exits, when its handlers are gone (-2, killed by SIGINT: a shell shows
            # 130 either way); --max-tasks may end it first.
            expected = {"kill -9": (-9,), "warm stop": (0,), "cold stop": (0, 130, -2)}[what]
            expected += (0,) if "--max-tasks" in self.settings else ()
        elif "--max-tasks" in self.settings and code == 0:
            self.recycled += 1
            expected = (0,)
        else:
            self.chaos.timeline.say(f"{self.name}: exited {code}" + (" (a task crashed it)" if code == -9 else ""))
            expected = (-9,)  # a crash task, run in the worker's own process
        if code not in expected and not overran:  # (an overrun's kill -9 is its own broken rule already)
            self.chaos.ledger.bad_exits.append(f"{self.name} exit {code} (see {self.log.name})")

    def has_spoken(self) -> bool:
        """Whether the running process printed a line yet. A stop is aimed only at a worker that has: its
        first line comes after its Ctrl+C handler is in place; before, while Python and pika still load,
        Ctrl+C ends it by KeyboardInterrupt, as it would any program starting up."""
        return os.path.getsize(self.log.name) > self.log_size

    def hit(self, kind: str) -> bool:
        """Carry out a fault aimed at this worker, and say so on the timeline first; False if skipped."""
        with self.lock:
            process = self.process
            if process is None or process.poll() is not None or self.stopping:
                self.chaos.timeline.say(f"{kind} {self.name}: not running, skipped")
                return False
            if kind in ("warm stop", "cold stop") and not self.has_spoken():
                self.chaos.timeline.say(f"{kind} {self.name}: still starting, skipped")
                return False
            if kind in STOP_BOUNDS:
                self.stopping = (kind, time.monotonic(), STOP_BOUNDS[kind])
        self.chaos.timeline.say(f"{kind} {self.name} (pid {process.pid})")
        if kind == "kill -9":
            process.kill()
        elif kind == "warm stop":
            process.send_signal(signal.SIGINT)
        elif kind == "cold stop":
            process.send_signal(signal.SIGINT)
            time.sleep(0.3)
            process.send_signal(signal.SIGINT)
        elif kind == "connection reset":
            for proxy in self.chaos.proxies[self.name]:
                proxy.cut()
        elif kind == "silent connection":
            for proxy in self.chaos.proxies[self.name]:
                proxy.freeze()
        return True

    def stop(self) -> None:
        """At the end: a warm stop, held to its bound; not started again."""
        deadline = time.monotonic() + 60
        while not self.has_spoken() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.hit("warm stop")
        self.thread.join(WARM_STOP_BOUND + 10)
        self.log.close()


class Chaos:
    def __init__(self, args: argparse.Namespace, logs: Path):
        self.args = args
        self.max_retries = args.max_retries
        self.logs = logs
        self.ledger_file = logs / "ledger.txt"
        self.ledger = Ledger()
        self.timeline = Timeline()
        self.ending = threading.Event()
        self.broker: local_broker.BrokerNode | local_broker.BrokerCluster | None = None
        self.proxies: dict[str, list[local_broker.TcpProxy]] = {}
        self.workers: list[Supervised] = []
        self.producer: subprocess.Popen | None = None

    @property
    def nodes(self) -> list[local_broker.BrokerNode]:
        return self.broker.nodes if isinstance(self.broker, local_broker.BrokerCluster) else [self.broker]

    def run(self) -> int:
        args = self.args
        if args.cluster:
            self.broker = local_broker.BrokerCluster(3, name="chaos", rabbitmq=args.rabbitmq)
        else:
            self.broker = local_broker.BrokerNode(name="chaos", rabbitmq=args.rabbitmq)
        try:
            return self.run_on_broker()
        finally:
            self.ending.set()
            for worker in self.workers:
                if worker.process and worker.process.poll() is None:
                    worker.process.kill()
            if self.producer and self.producer.poll() is None:
                self.producer.kill()
            for proxies in self.proxies.values():
                for proxy in proxies:
                    proxy.close()
            self.broker.destroy()

    def run_on_broker(self) -> int:
        args = self.args
        faults = plan_faults(args.seed, args.seconds, len(self.nodes))
        tasks = plan_tasks(args.seed, int(args.seconds * args.rate))
        print(
            f"chaos: seed {args.seed}, {args.seconds:g} s, {len(tasks)} tasks, {len(faults)} faults planned, "
            f"--max-retries {args.max_retries}; RabbitMQ {args.rabbitmq}, {len(self.nodes)} node(s); "
            f"logs in {self.logs}",
            flush=True,
        )
        self.broker.start()
        version = local_broker.RabbitMQ(args.rabbitmq).version()
        self.timeline = Timeline()
        self.timeline.say(
            f"RabbitMQ {version} up; workers: " + "; ".join(f"{n} {' '.join(s)}" for n, s in WORKERS.items())
        )
        for number, (name, settings) in enumerate(WORKERS.items()):
            nodes = self.nodes[number % len(self.nodes) :] + self.nodes[: number % len(self.nodes)]  # spread them
            self.proxies[name] = [local_broker.TcpProxy(node.port) for node in nodes]
            self.workers.append(
                Supervised(self, name, settings, [f"{p.url()}?heartbeat={HEARTBEAT}" for p in self.proxies[name]])
            )
        for worker in self.workers:
            worker.thread.start()
        feeder = threading.Thread(target=self.feed, args=(tasks,), name="producer", daemon=True)
        feeder.start()
        for fault in faults:
            time.sleep(max(0.0, fault.at - self.timeline.now()))
            if self.strike(fault):
                self.ledger.faults += 1
        feeder.join()
        self.timeline.say(f"the last of {len(self.ledger.sent)} tasks written to the producer; waiting for it")
        try:
            self.ledger.producer_exit = self.producer.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.ledger.producer_exit = None
        self.timeline.say(f"the producer exited {self.ledger.producer_exit}; waiting for the queues to empty")
        self.ledger.left = self.wait_empty(timeout=300)
        self.timeline.say("the queues are empty" if not self.ledger.left else f"{self.ledger.left} tasks still queued")
        self.ending.set()
        for worker in self.workers:
            worker.stop()
        self.timeline.say(
            "every worker stopped; " + ", ".join(f"{w.name} recycled {w.recycled}x" for w in self.workers if w.recycled)
        )
        self.ledger.dead = self.read_dead_letters()
        self.ledger.read_notes(self.ledger_file.read_text() if self.ledger_file.exists() else "")
        line, broken = check(self.ledger)
        print(line)
        if not broken:
            return 0
        for what in broken:
            print(f"broken: {what}")
        print(f"run it again: ./run.sh chaos {' '.join(self.again())}   (logs: {self.logs})")
        return 1

    def again(self) -> list[str]:
        args = self.args
        again = ["--seed", str(args.seed), "--seconds", f"{args.seconds:g}", "--rabbitmq", args.rabbitmq]
        if args.cluster:
            again.append("--cluster")
        if args.max_retries != 3:
            again += ["--max-retries", str(args.max_retries)]
        if args.rate != 10:
            again += ["--rate", f"{args.rate:g}"]
        return again

    def feed(self, tasks: list[str]) -> None:
        """The producer: new_task.py --file - with a task written to its pipe every 1/rate seconds."""
        urls = [arg for node in self.nodes for arg in ("--url", f"{node.url}?heartbeat={HEARTBEAT}")]
        with open(self.logs / "producer.log", "ab") as log:
            self.producer = subprocess.Popen(
                [sys.executable, str(HERE / "new_task.py"), "--file", "-", "--queue", QUEUE, *urls],
                stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        began = time.monotonic()
        for number, body in enumerate(tasks):
            time.sleep(max(0.0, began + number / self.args.rate - time.monotonic()))
            try:
                self.producer.stdin.write(f"{body}\n".encode())
                self.producer.stdin.flush()
            except BrokenPipeError:
                break
            task_id, kind, *_ = body.split()
            self.ledger.sent[task_id] = kind
        try:
            self.producer.stdin.close()
        except BrokenPipeError:
            pass

    def strike(self, fault: Fault) -> bool:
        """Carry out one fault (a broker's waits until it is back), and say what it was; False if skipped."""
        if fault.kind in WORKER_FAULTS:
            return next(w for w in self.workers if w.name == fault.target).hit(fault.kind)
        node = self.nodes[int(fault.target)]
        where = f"node {fault.target}" if len(self.nodes) > 1 else "the broker"
        if fault.kind == "memory alarm":
            self.timeline.say(f"memory alarm on {where} for {fault.hold:g} s: publishers are blocked")
            node.rabbitmqctl("set_vm_memory_high_watermark", "0")
            time.sleep(fault.hold)
            node.rabbitmqctl("set_vm_memory_high_watermark", "0.4")
            self.timeline.say("memory alarm cleared")
            return True
        if fault.kind == "broker restart":
            self.timeline.say(f"{where}: stop (rabbitmqctl stop), down for {fault.hold:g} s")
            node.stop()
        else:
            self.timeline.say(f"{where}: kill -9, down for {fault.hold:g} s")
            node.kill()
        time.sleep(fault.hold)
        node.start(timeout=180)
        if isinstance(self.broker, local_broker.BrokerCluster):
            self.broker.wait_running(len(self.nodes), timeout=180)
        self.timeline.say(f"{where} is back")
        return True

    def wait_empty(self, timeout: float) -> int:
        """Until the work queue and its wait queues hold nothing, twice a second apart; what they hold."""
        deadline = time.monotonic() + timeout
        empty_before = False
        while True:
            out = self.nodes[0].rabbitmqctl("list_queues", "name", "messages", "--quiet", "--no-table-headers")
            held = sum(
                int(count)
                for name, count in (line.split("\t") for line in out.splitlines() if "\t" in line)
                if name != workqueue.dead_letter_queue(QUEUE)
            )
            if not held and empty_before:
                return 0
            empty_before = not held
            if time.monotonic() > deadline:
                return held
            time.sleep(1)

    def read_dead_letters(self) -> dict[str, list[str]]:
        """Each dead letter's task id and reason (x-error); read and left where they are."""
        dead: dict[str, list[str]] = {}
        with pika.BlockingConnection(pika.URLParameters(self.nodes[0].url)) as connection:
            channel = connection.channel()
            while True:
                method, properties, body = channel.basic_get(workqueue.dead_letter_queue(QUEUE))
                if method is None:
                    break
                reason = workqueue.printable(str((properties.headers or {}).get("x-error", "no x-error")), 200)
                task_id = workqueue.printable(body, 40).split(" ", 1)[0]
                dead.setdefault(task_id, []).append(reason)
        return dead


def main() -> int:
    parser = argparse.ArgumentParser(
        description="A live work queue under a seeded schedule of random faults, and a ledger of every task.",
        epilog=__doc__.split("\n\n")[-1] + "\n\nexit codes: 0 every invariant held; 1 one did not (it says which, and "
        "the command to run it again); 2 bad usage",
        formatter_class=workqueue.HelpFormatter,
    )
    parser.add_argument(
        "--seed", type=int, default=random.randrange(10_000), help="the schedule's seed (default: random)"
    )
    parser.add_argument(
        "--seconds",
        type=workqueue.number(float, minimum=10),
        default=60,
        metavar="S",
        help="how long tasks are sent and faults strike (the end waits for the queue to empty)",
    )
    parser.add_argument(
        "--rate", type=workqueue.number(float, minimum=0.1), default=10, metavar="N", help="tasks sent per second"
    )
    parser.add_argument(
        "--max-retries", type=workqueue.non_negative(int), default=3, metavar="N", help="every worker's --max-retries"
    )
    parser.add_argument("--cluster", action="store_true", help="three nodes; a broker fault hits one of them")
    parser.add_argument(
        "--rabbitmq",
        choices=local_broker.RELEASES,
        default=local_broker.default_release(),
        help="which RabbitMQ the throwaway nodes run (default: $WORKQUEUE_RABBITMQ, else %(default)s)",
    )
    args = parser.parse_args()  # fmt: skip
    logs = Path(tempfile.mkdtemp(prefix=f"chaos-{args.seed}-"))
    chaos = Chaos(args, logs)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the workers and the nodes on the way out
    code = chaos.run()
    if code == 0:
        shutil.rmtree(logs, ignore_errors=True)
    return code


if __name__ == "__main__":
    workqueue.run(main)
