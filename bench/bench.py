#!/usr/bin/env python
"""Benchmark: publishing, draining, fair dispatch and memory, side by side on one broker.

    ./run.sh bench            # full sizes, a few minutes
    ./run.sh bench --quick    # small sizes, to check that it runs
    ./run.sh bench --publish  # only the ways of publishing (a minute)

Every figure is a whole process, start-up included, on persistent messages and
a quorum queue, on a throwaway broker node (or --url). Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pika

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import peers  # noqa: E402
import turnaround  # noqa: E402

import local_broker  # noqa: E402
import workqueue  # noqa: E402

BENCH = ROOT / "bench"
PY = sys.executable
UNBUFFERED = {**os.environ, "PYTHONUNBUFFERED": "1"}  # every line as it is printed, for every worker
# Python's default, bytecode cached: with PYTHONDONTWRITEBYTECODE set (some CI and container images set it),
# every start compiles a script's own modules again (workqueue/: about 15 ms), which no installed copy does.
UNBUFFERED.pop("PYTHONDONTWRITEBYTECODE", None)


# Runs a command and reports its time and peak RSS. A small process of its own, because Linux
# carries a parent's peak RSS over fork and exec into the child's figure.
MEASURE = """
import resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)
"""


def timed(cmd: list[str], stdin_path: str | None = None) -> tuple[float, float]:
    """Run a process to the end: (seconds, its peak RSS in MB)."""
    with open(stdin_path or os.devnull, "rb") as stdin:
        out = subprocess.run([PY, "-c", MEASURE, *cmd], stdin=stdin, capture_output=True, text=True, check=True)
    seconds, peak_kb, code = out.stdout.split()
    if code != "0":
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed: {out.stderr[-500:]}")
    return float(seconds), int(peak_kb) / 1024


def ours(script: str, url: str, queue: str, *args) -> list[str]:
    """The command line of one of our scripts."""
    return [PY, str(ROOT / script), "--url", url, "--queue", queue, *map(str, args)]


def fill(url: str, queue: str, lines: Path | str) -> None:
    subprocess.run(ours("new_task.py", url, queue, "--file", lines), check=True, capture_output=True)


def delete(url: str, queue: str) -> None:
    """Remove a queue and the dead-letter queue that our workers declare beside it."""
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.queue_delete(queue)
        channel.queue_delete(queue + ".dlq")


def write_lines(path: Path, count: int, dots: int = 0) -> str:
    with path.open("w") as file:
        file.writelines(f"task {i}{'.' * dots}\n" for i in range(count))
    return str(path)


# --- 1. Publishing ------------------------------------------------------------------


def publish_rows(url: str, count: int, per_process: int, tmp: Path) -> list[tuple[str, int, float, float]]:
    """(strategy, messages, rate/s, peak MB) for each way of publishing messages to a fresh queue."""
    q = "bench_publish"
    rows = []
    started = time.perf_counter()
    for i in range(per_process):
        subprocess.run([PY, BENCH / "tutorial_new_task.py", url, q, f"task {i}"], check=True, capture_output=True)
    rate = per_process / (time.perf_counter() - started)
    rows.append(("tutorial new_task.py, one process per message", per_process, rate, 0.0))
    delete(url, q)

    confirmed_one_by_one = min(count, 5000)  # ~1k/s: a smaller run says the same
    short, full = write_lines(tmp / "short.txt", confirmed_one_by_one), write_lines(tmp / "full.txt", count)
    for name, n, cmd in [
        ("pika loop, confirm_delivery() (a round trip each)", confirmed_one_by_one,
         [PY, str(BENCH / "pika_loop.py"), url, q, short, "--confirm"]),
        ("pika loop, no confirms (unsafe)", count, [PY, str(BENCH / "pika_loop.py"), url, q, full]),
        ("ours: new_task.py --file (confirms, 1000 in flight)", count, ours("new_task.py", url, q, "--file", full)),
        ("ours: Producer.send_many() (the library; confirms, 1000 in flight)", count,
         [PY, str(BENCH / "producer_send.py"), url, q, full, "bulk"]),
        ("ours: Producer.send() from 16 threads (each waits for its confirm)", confirmed_one_by_one,
         [PY, str(BENCH / "producer_send.py"), url, q, short, "threads"]),
    ]:  # fmt: skip
        seconds, peak = timed(cmd)
        rows.append((name, n, n / seconds, peak))
        delete(url, q)
    return rows


def publish_table(publish: list[tuple[str, int, float, float]]) -> list[str]:
    """The table's rows for publish_rows(), each against new_task.py's rate."""
    ours = next(rate for name, _, rate, _ in publish if name.startswith("ours: new_task.py"))
    return [
        f"| publish: {name} | {n:,} | {rate:,.0f}/s | {rate / ours:.2f}x ours | {f'{peak:.0f} MB' if peak else ''} |"
        for name, n, rate, peak in publish
    ]


# --- 2. Draining ------------------------------------------------------------------


def drain_rate(url: str, cmd: list[str], q: str, count: int, tmp: Path, *, dots: int = 0) -> float:
    """Tasks per second for a worker to take `count` tasks (empty, or of `dots` dots) off a full queue,
    start-up included."""
    fill(url, q, write_lines(tmp / "drain.txt", count, dots))
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=UNBUFFERED)
    done = 0
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        if b"Done" in line:
            done += 1
            if done == count:
                break
        if time.monotonic() > deadline:
            break
    seconds = time.perf_counter() - started
    proc.kill()
    proc.wait(timeout=10)
    delete(url, q)
    if done < count:
        raise RuntimeError(f"drain: only {done} of {count} done")
    return count / seconds


def prefetch_one_rows(url: str, count: int, rounds: int, tmp: Path, broker: str) -> list[str]:
    """./run.sh bench --drain: the tutorial's worker and ours at prefetch 1, alternating, each run against
    the tutorial's of its round; and, with a packet capture, each one's own time per task."""
    q = "bench_drain"
    workers = {
        "tutorial worker.py": [PY, str(BENCH / "tutorial_worker.py"), url, q],
        "ours: worker.py --prefetch 1": ours("worker.py", url, q, "--dot-seconds", 0, "--prefetch", 1),
    }
    print("Draining at prefetch 1...", file=sys.stderr)
    rates: dict[str, list[float]] = {name: [] for name in workers}
    for name, cmd in alternating(workers, rounds):
        rates[name].append(drain_rate(url, cmd, q, count, tmp))
    times: dict[str, list[float]] = {name: [] for name in workers}
    if turnaround.can_capture():
        port = urlsplit(url).port or 5672
        for name, cmd in alternating(workers, max(1, rounds // 2)):
            worker_time, _ = turnaround.turnarounds(port, functools.partial(drain_rate, url, cmd, q, count, tmp))
            times[name].append(worker_time)
    tutorial_rates = rates["tutorial worker.py"]
    out = [
        f"{broker}, {os.cpu_count()} cores, Python {platform.python_version()}, pika {pika.__version__}; "
        f"{count:,} empty tasks per run, persistent, quorum queue, start-up included",
        "",
        "| worker, prefetch 1 | runs | drain rate (median) | vs the tutorial's of its round: median (range) "
        "| own time per task |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in rates.items():
        ratios = [rate / tutorial for rate, tutorial in zip(runs, tutorial_rates)]
        own = f"{statistics.median(times[name]):.0f} µs" if times[name] else "(needs root)"
        out.append(
            f"| {name} | {len(runs)} | {statistics.median(runs):,.0f}/s "
            f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {own} |"
        )
    return out


def alternating(commands: dict[str, list[str]], rounds: int):
    """(name, command) for each round, in turn forward and backward, so that no one always goes first."""
    order = list(commands.items())
    for round_number in range(rounds):
        yield from order if round_number % 2 == 0 else reversed(order)


# --- 3. Fair dispatch -----------------------------------------------------------------


def mixed_tasks(count: int) -> list[int]:
    """Dots per task: every third task heavy (8 dots), the rest light (1 dot)."""
    return [8 if i % 3 == 0 else 1 for i in range(count)]


def ideal_makespan(dots: list[int], workers: int, dot_seconds: float) -> float:
    """Greedy schedule: each task, in queue order, to the first free worker."""
    free_at = [0.0] * workers
    for d in dots:
        heapq.heappush(free_at, heapq.heappop(free_at) + d * dot_seconds)
    return max(free_at)


def measured_makespan(url: str, prefetch: int, dots: list[int], dot_seconds: float, tmp: Path) -> float:
    """3 workers of ours: seconds from publishing the tasks to the last Done."""
    q = f"bench_fair_{prefetch}"
    done_times: list[float] = []
    ready = threading.Barrier(4)
    procs = []

    def read(proc):
        for line in proc.stdout:
            if b"Waiting for messages" in line:
                ready.wait(timeout=60)
            elif b"Done" in line:
                done_times.append(time.perf_counter())

    for n in range(3):
        cmd = ours("worker.py", url, q, "--name", f"w{n}", "--prefetch", prefetch, "--dot-seconds", dot_seconds)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=UNBUFFERED)
        procs.append(proc)
        threading.Thread(target=read, args=(proc,), daemon=True).start()
    ready.wait(timeout=60)
    lines = tmp / "fair.txt"
    lines.write_text("".join(f"task{i}{'.' * d}\n" for i, d in enumerate(dots)))
    started = time.perf_counter()
    fill(url, q, lines)
    deadline = time.monotonic() + 300
    while len(done_times) < len(dots) and time.monotonic() < deadline:
        time.sleep(0.01)
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)
    delete(url, q)
    return max(done_times) - started


# --- 4. Memory --------------------------------------------------------------------------


def publish_memory(url: str, count: int, tmp: Path) -> tuple[float, float]:
    """(peak RSS MB, rate/s) of new_task.py --file - with `count` lines on standard input."""
    q = "bench_memory"
    lines = write_lines(tmp / f"memory_{count}.txt", count)
    seconds, peak = timed(ours("new_task.py", url, q, "--file", "-"), stdin_path=lines)
    delete(url, q)
    return peak, count / seconds


CONCURRENCY = (1, 4, 16)
IO_TASK_SECONDS = 0.05  # one dot: a task that waits 50 ms, as an HTTP call or an e-mail would


def concurrency_row(what: str, concurrency: int, count: int, rates: dict[int, list[float]], also: str = "") -> str:
    """A drain row of ours at --concurrency N (prefetch N), each run against --concurrency 1 of its round."""
    ratios = [rate / single for rate, single in zip(rates[concurrency], rates[1])]
    spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
    rate = statistics.median(rates[concurrency])
    return (
        f"| drain, {what}: **ours**: worker.py --concurrency {concurrency} | {count:,} x {len(ratios)} "
        f"| {rate:,.0f}/s | {statistics.median(ratios):.2f}x --concurrency 1{spread}{also} | |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: checks that the benchmark runs")
    parser.add_argument("--url", help="use this broker instead of a throwaway node (queues bench_*, peer_*)")
    parser.add_argument("--no-peers", action="store_true", help="leave out Celery and Dramatiq")
    parser.add_argument(
        "--drain",
        action="store_true",
        help="only the tutorial's worker and ours at prefetch 1, in alternating rounds (about 2 minutes)",
    )
    parser.add_argument(
        "--publish", action="store_true", help="only the ways of publishing: the tutorial's, ours, the library's"
    )
    args = parser.parse_args()
    publish_n, per_process, drain_n, rounds, fair_n, dot = (
        (2000, 5, 500, 1, 9, 0.02) if args.quick else (100_000, 40, 5_000, 8, 30, 0.1)
    )
    io_n, io_rounds = (40, 1) if args.quick else (400, 3)  # 50 ms tasks: 20 s a run at --concurrency 1
    memory_sizes = (10_000, 100_000) if args.quick else (100_000, 1_000_000)

    node = None
    if args.url:
        url = args.url
    else:
        rabbitmq = local_broker.RabbitMQ()  # the system's, or $WORKQUEUE_RABBITMQ (./run.sh bench --rabbitmq 4.3)
        print(f"Starting a throwaway RabbitMQ {rabbitmq.version()} node...", file=sys.stderr)
        node = local_broker.BrokerNode(name="bench", rabbitmq=rabbitmq).start()
        url = node.url
    out = []
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            with pika.BlockingConnection(pika.URLParameters(url)) as connection:
                broker = "RabbitMQ " + ".".join(map(str, workqueue.broker_version(connection)))
            if args.drain:
                print("\n".join(prefetch_one_rows(url, drain_n, rounds, tmp, broker)))
                return 0
            print("Publishing...", file=sys.stderr)
            publish = publish_rows(url, publish_n, per_process, tmp)
            if args.publish:
                print(f"{broker}, {os.cpu_count()} cores\n\n| what | size | rate | vs ours | peak RSS |")
                print("| --- | ---: | ---: | ---: | ---: |")
                print("\n".join(publish_table(publish)))
                return 0
            print("Draining...", file=sys.stderr)
            q = "bench_drain"
            tutorial = [PY, str(BENCH / "tutorial_worker.py"), url, q]
            workers = {"tutorial worker.py (prefetch 1)": tutorial}
            for prefetch in (1, 10, 100):
                cmd = ours("worker.py", url, q, "--dot-seconds", 0, "--prefetch", prefetch)
                workers[f"ours: worker.py --prefetch {prefetch}"] = cmd
            for prefetch in (1, 10):  # each task in a child process (what --time-limit implies)
                cmd = ours("worker.py", url, q, "--dot-seconds", 0, "--prefetch", prefetch, "--isolation", "process")
                workers[f"ours: worker.py --prefetch {prefetch} --isolation process"] = cmd
            # A run's rate swings by +-10% with the broker's disk writes: so, rounds of one run each (in
            # turn forward and backward), each run compared with the tutorial's of its round; medians shown.
            rates: dict[str, list[float]] = {name: [] for name in workers}
            for name, cmd in alternating(workers, rounds):
                rates[name].append(drain_rate(url, cmd, q, drain_n, tmp))
            times: dict[str, list[tuple[float, float]]] = {}
            if turnaround.can_capture():
                print("Turnaround at prefetch 1 (packet capture on lo)...", file=sys.stderr)
                port = urlsplit(url).port or 5672
                pair = dict(list(workers.items())[:2])  # the tutorial's and ours, both at prefetch 1
                for name, cmd in alternating(pair, max(1, rounds // 2)):
                    run = functools.partial(drain_rate, url, cmd, q, drain_n, tmp)
                    times.setdefault(name, []).append(turnaround.turnarounds(port, run))
            else:
                print("Turnaround: skipped (a packet capture needs root)", file=sys.stderr)
            print("Concurrency...", file=sys.stderr)
            concurrent = {
                c: ours("worker.py", url, q, "--dot-seconds", IO_TASK_SECONDS, "--concurrency", c) for c in CONCURRENCY
            }
            empty_rates: dict[int, list[float]] = {c: [] for c in CONCURRENCY}
            io_rates: dict[int, list[float]] = {c: [] for c in CONCURRENCY}
            for c, cmd in alternating(concurrent, rounds):
                empty_rates[c].append(drain_rate(url, cmd, q, drain_n, tmp))
            for c, cmd in alternating(concurrent, io_rounds):
                io_rates[c].append(drain_rate(url, cmd, q, io_n, tmp, dots=1))
            print("Fair dispatch...", file=sys.stderr)
            dots = mixed_tasks(fair_n)
            ideal = ideal_makespan(dots, 3, dot)
            fair = measured_makespan(url, 1, dots, dot, tmp)
            rr = measured_makespan(url, 0, dots, dot, tmp)
            print("Memory...", file=sys.stderr)
            memory = [(n, *publish_memory(url, n, tmp)) for n in memory_sizes]
            peer_rows = [] if args.no_peers else peers.rows(url, args.quick, ideal_makespan)
    finally:
        if node:
            node.destroy()

    tutorial_drain = next(iter(rates.values()))
    out.append(
        f"Machine: {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, pika {pika.__version__}, {broker}; persistent messages, quorum queue, "
        "loopback."
    )
    out.append("")
    out.append("| what | size | rate | vs ours / vs tutorial | peak RSS |")
    out.append("| --- | ---: | ---: | ---: | ---: |")
    out.extend(publish_table(publish))
    for name, runs in rates.items():
        ratios = [rate / tutorial for rate, tutorial in zip(runs, tutorial_drain)]
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(runs) > 1 else ""
        out.append(
            f"| drain: {name} | {drain_n:,} x {len(runs)} | {statistics.median(runs):,.0f}/s "
            f"| {statistics.median(ratios):.2f}x tutorial{spread} | |"
        )
    costs = []
    for prefetch in (1, 10):  # what a task costs more in a child process than in a thread, same rounds
        thread, process = (
            rates[f"ours: worker.py --prefetch {prefetch}"],
            rates[f"ours: worker.py --prefetch {prefetch} --isolation process"],
        )
        costs.append(statistics.median(1e6 / p - 1e6 / t for p, t in zip(process, thread)))
    out.append(
        f"| --isolation process: cost per task over threads, prefetch 1 / prefetch 10 | {drain_n:,} x {rounds} "
        f"| {costs[0]:+.0f} µs / {costs[1]:+.0f} µs | | |"
    )
    if times:
        tutorial_time = statistics.median(worker for worker, _ in next(iter(times.values())))
        for name, runs in times.items():
            worker_time = statistics.median(worker for worker, _ in runs)
            out.append(
                f"| worker's time per task (delivery in, ack out): {name} | {drain_n:,} x {len(runs)} "
                f"| {worker_time:.0f} µs | {worker_time / tutorial_time:.2f}x tutorial | |"
            )
        broker_time = statistics.median(broker for runs in times.values() for _, broker in runs)
        out.append(f"| broker's time per task at prefetch 1 (ack in, next delivery out) | | {broker_time:.0f} µs | | |")
    for c in CONCURRENCY:
        out.append(concurrency_row("empty tasks", c, drain_n, empty_rates))
    for c in CONCURRENCY:
        best = c / IO_TASK_SECONDS  # every thread always busy, nothing else taking time
        also = f", {statistics.median(io_rates[c]) / best:.2f}x ideal ({best:,.0f}/s)"
        out.append(concurrency_row(f"{IO_TASK_SECONDS * 1000:.0f} ms I/O-bound tasks", c, io_n, io_rates, also))
    for label, makespan in (("prefetch 1 (fair)", fair), ("prefetch 0 (round-robin)", rr)):
        out.append(
            f"| makespan, 3 workers, {fair_n} mixed tasks: {label} | {fair_n} | {makespan:.2f} s "
            f"| {makespan / ideal:.2f}x ideal ({ideal:.2f} s) | |"
        )
    for n, peak, rate in memory:
        out.append(f"| memory: new_task.py --file - | {n:,} | {rate:,.0f}/s | | {peak:.0f} MB |")
    out += peer_rows
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
