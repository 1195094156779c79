"""Celery and Dramatiq beside ours, on the same broker, in the same run (./run.sh bench).

Each system runs its own worker process with its own API and its own publisher; every task is
the same (peer_tasks.run: sleep per dot, then count itself done), and every run is checked to
have done every task exactly once. Celery and Dramatiq declare classic queues: ours runs on a
classic queue to compare, and on a quorum queue beside it. Whole processes, start-up included.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pika

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable


@dataclass
class System:
    """One way of running the tasks: how to start a worker, how to send, which queues it uses."""

    name: str
    worker: list[str]
    send: list[str]  # + a file of one task per line
    queues: list[str]  # the work queue first; all are deleted between runs
    env: dict = field(default_factory=dict)


def ours(label: str, queue_type: str, *worker_args: str) -> System:
    queue = f"peer_ours_{queue_type}"
    common = ["--queue", queue, "--queue-type", queue_type]
    return System(
        f"ours ({queue_type}): worker.py {label}".strip(),
        [PY, str(ROOT / "worker.py"), *common, "--task", "peer_tasks:run", "--retry-delays", "0", *worker_args],
        [PY, str(ROOT / "new_task.py"), *common, "--file"],
        [queue, f"{queue}.dlq"],
    )


def celery(concurrency: int, prefetch_multiplier: int) -> System:
    return System(
        f"Celery: --pool threads -c {concurrency}, acks_late, prefetch multiplier {prefetch_multiplier}",
        [PY, "-m", "celery", "-A", "peer_celery", "worker", "--pool", "threads", "-c", str(concurrency),
         "-Q", "peer_celery", "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"],
        [PY, str(BENCH / "peer_celery.py")],
        ["peer_celery"],
        {"BENCH_QUEUE": "peer_celery", "BENCH_PREFETCH_MULTIPLIER": str(prefetch_multiplier)},
    )  # fmt: skip


def dramatiq(threads: int, prefetch: int | None = None) -> System:
    env = {"BENCH_QUEUE": "peer_dramatiq"}
    if prefetch:
        env["dramatiq_queue_prefetch"] = str(prefetch)
    shown = f", prefetch {prefetch}" if prefetch else ", default prefetch"
    return System(
        f"Dramatiq: --processes 1 --threads {threads}{shown}",
        [PY, "-m", "dramatiq", "peer_dramatiq", "--processes", "1", "--threads", str(threads)],
        [PY, str(BENCH / "peer_dramatiq.py")],
        ["peer_dramatiq", "peer_dramatiq.DQ", "peer_dramatiq.XQ"],
        env,
    )


class Lab:
    """The broker, a scratch directory, and the environment every process gets."""

    def __init__(self, url: str, tmp: Path, dot_seconds: float):
        self.url = url
        self.tmp = tmp
        self.done_file = tmp / "done"
        self.env = {
            **os.environ,
            "BENCH_AMQP_URL": url,
            "AMQP_URL": url,  # ours
            "BENCH_DONE_FILE": str(self.done_file),
            "BENCH_DOT_SECONDS": str(dot_seconds),
            "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
        }

    def delete(self, system: System) -> None:
        with pika.BlockingConnection(pika.URLParameters(self.url)) as connection:
            channel = connection.channel()
            for queue in system.queues:
                channel.queue_delete(queue)

    def declared(self, queue: str) -> tuple[int, int] | None:
        """(ready, consumers) of a queue, live; None if it does not exist yet."""
        with pika.BlockingConnection(pika.URLParameters(self.url)) as connection:
            try:
                method = connection.channel().queue_declare(queue, passive=True).method
            except pika.exceptions.ChannelClosedByBroker:
                return None
            return method.message_count, method.consumer_count

    def send(self, system: System, bodies: list[str]) -> None:
        lines = self.tmp / "tasks.txt"
        lines.write_text("".join(f"{body}\n" for body in bodies))
        subprocess.run([*system.send, str(lines)], env={**self.env, **system.env}, check=True, capture_output=True)

    def done(self) -> int:
        try:
            return self.done_file.stat().st_size
        except FileNotFoundError:
            return 0

    def start_workers(self, system: System, count: int) -> list[subprocess.Popen]:
        self.worker_log = self.tmp / "workers.log"  # what they print: shown if they stall
        with open(self.worker_log, "wb") as log:
            return [
                subprocess.Popen(
                    system.worker,
                    env={**self.env, **system.env},
                    cwd=BENCH,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # its own process group: Dramatiq forks worker processes
                )
                for _ in range(count)
            ]

    def wait_done(self, expected: int, timeout: float, system: System) -> float:
        deadline = time.monotonic() + timeout
        while self.done() < expected:
            if time.monotonic() > deadline:
                said = self.worker_log.read_text(errors="replace").strip().splitlines()[-15:]
                progress = f"{self.done()} of {expected} tasks done in {timeout:.0f}s"
                raise Stalled(
                    f"{system.name}: {progress}; its worker's last lines:\n" + "\n".join(said or ["(none)"]),
                    progress,
                )
            time.sleep(0.005)
        return time.perf_counter()

    @staticmethod
    def stop(workers: list[subprocess.Popen]) -> None:
        for worker in workers:
            try:
                os.killpg(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            worker.wait(timeout=30)


class Stalled(RuntimeError):
    """A worker that did not finish its tasks in time; `progress` says how far it got."""

    def __init__(self, message: str, progress: str):
        super().__init__(message)
        self.progress = progress


def drain_rate(lab: Lab, system: System, count: int, dots: int = 0, timeout: float = 600) -> float:
    """Tasks per second for one worker process to empty a queue of `count` tasks, start-up included."""
    lab.delete(system)
    lab.send(system, [f"task {i}{'.' * dots}" for i in range(count)])
    lab.done_file.unlink(missing_ok=True)
    started = time.perf_counter()
    workers = lab.start_workers(system, 1)
    try:
        finished = lab.wait_done(count, timeout=timeout, system=system)
    finally:
        lab.stop(workers)
    if lab.done() != count:
        raise RuntimeError(f"{system.name}: {lab.done()} tasks done for {count} sent (some twice)")
    lab.delete(system)
    return count / (finished - started)


def makespan(lab: Lab, system: System, dots: list[int]) -> float:
    """3 worker processes, ready and waiting: seconds from sending the tasks to the last one done."""
    lab.delete(system)
    lab.done_file.unlink(missing_ok=True)
    workers = lab.start_workers(system, 3)
    try:
        deadline = time.monotonic() + 120
        while (lab.declared(system.queues[0]) or (0, 0))[1] < 3:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{system.name}: the 3 workers did not start consuming")
            time.sleep(0.1)
        started = time.perf_counter()
        lab.send(system, [f"task{i}{'.' * d}" for i, d in enumerate(dots)])
        finished = lab.wait_done(len(dots), timeout=300, system=system)
    finally:
        lab.stop(workers)
    if lab.done() != len(dots):
        raise RuntimeError(f"{system.name}: {lab.done()} tasks done for {len(dots)} sent")
    lab.delete(system)
    return finished - started


def alternate(systems: list[System], rounds: int):
    for number in range(rounds):
        yield from systems if number % 2 == 0 else reversed(systems)


def rows(url: str, quick: bool, ideal_makespan) -> list[str]:
    """The peer rows of the benchmark's table, Markdown."""
    import celery as celery_package  # noqa: PLC0415
    import dramatiq as dramatiq_package  # noqa: PLC0415

    count, io_count, rounds, mixed = (200, 40, 1, 9) if quick else (5000, 400, 3, 30)
    out = [
        f"| **peers** (Celery {celery_package.__version__}, Dramatiq {dramatiq_package.__version__}; "
        "each row against ours on a classic queue in the same round) | | | | |"
    ]
    with tempfile.TemporaryDirectory() as tmp_name:
        lab = Lab(url, Path(tmp_name), dot_seconds=0.05)
        groups = [
            ("drain, no-op tasks, one at a time (prefetch 1, ack after the task)", count, 0, [
                ours("--prefetch 1", "classic", "--prefetch", "1"),
                ours("--prefetch 1", "quorum", "--prefetch", "1"),
                dramatiq(1, prefetch=1),
                celery(1, 1),
            ]),
            ("drain, no-op tasks, best settings that ack after the task", count, 0, [
                ours("--prefetch 100", "classic", "--prefetch", "100"),
                ours("--prefetch 100", "quorum", "--prefetch", "100"),
                dramatiq(8),
                celery(8, 4),
            ]),
            ("drain, 50 ms I/O-bound tasks, 8 at once", io_count, 1, [
                ours("--concurrency 8", "classic", "--concurrency", "8"),
                ours("--concurrency 8", "quorum", "--concurrency", "8"),
                dramatiq(8),
                celery(8, 1),
            ]),
        ]  # fmt: skip
        for what, n, dots, systems in groups:
            print(f"Peers: {what}...", file=sys.stderr)
            rates: dict[str, list[float]] = {s.name: [] for s in systems}
            stalled: dict[str, str] = {}  # a peer that stalled: its row says so, and the rest of the table is made
            for system in alternate(systems, rounds):
                if system.name in stalled:
                    continue
                try:
                    # A quick run's 200 tasks take seconds: a peer that stalls is named in 2 minutes, not 10.
                    rates[system.name].append(drain_rate(lab, system, n, dots, timeout=120 if quick else 600))
                except Stalled as error:
                    if system.name.startswith("ours"):  # a stall of ours is a bug to see, not a row
                        raise
                    print(f"  {error}", file=sys.stderr)
                    stalled[system.name] = error.progress
                    lab.delete(system)
            reference = rates[systems[0].name]
            for system in systems:
                runs = rates[system.name]
                if system.name in stalled:
                    out.append(f"| {what}: {system.name} | {n:,} | stalled: {stalled[system.name]} | | |")
                    continue
                ratios = [rate / ref for rate, ref in zip(runs, reference)]
                spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(runs) > 1 else ""
                out.append(
                    f"| {what}: {system.name} | {n:,} x {len(runs)} | {statistics.median(runs):,.0f}/s "
                    f"| {statistics.median(ratios):.2f}x ours classic{spread} | |"
                )
        print("Peers: fair-dispatch makespan...", file=sys.stderr)
        lab = Lab(url, Path(tmp_name), dot_seconds=0.1 if not quick else 0.02)
        dots = [8 if i % 3 == 0 else 1 for i in range(mixed)]
        ideal = ideal_makespan(dots, 3, 0.1 if not quick else 0.02)
        systems = [
            ours("--prefetch 1", "classic", "--prefetch", "1"),
            ours("--prefetch 1", "quorum", "--prefetch", "1"),
            dramatiq(1, prefetch=1),
            celery(1, 1),
        ]
        spans: dict[str, list[float]] = {s.name: [] for s in systems}
        for system in alternate(systems, rounds):
            spans[system.name].append(makespan(lab, system, dots))
        for system in systems:
            runs = spans[system.name]
            out.append(
                f"| makespan, 3 workers, {mixed} mixed tasks: {system.name} | {mixed} x {len(runs)} "
                f"| {statistics.median(runs):.2f} s | {statistics.median(runs) / ideal:.2f}x ideal ({ideal:.2f} s) | |"
            )
    return out
