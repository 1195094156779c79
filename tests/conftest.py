"""Fixtures: a throwaway RabbitMQ node for the whole run, and the scripts run as processes.

The node proposes heartbeat = 2 s, so every test also proves that the scripts
keep a connection alive while a task runs; it has a TLS listener with a CA
made for the run.

Tests run side by side (pytest-xdist, `-n`): each xdist worker is a process of its own with a
node of its own (the session fixtures below are per process), on ports the kernel handed out,
and every test uses queues of its own name. What cannot be shared that way is the machine: a
test that starts several nodes or loads both cores takes `whole_machine`, and its module is one
xdist group, so that its module fixture (a cluster, a run of every experiment) starts once.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pika
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import worker  # noqa: E402
import workqueue  # noqa: E402
from local_broker import RELEASES, BrokerError, BrokerNode, RabbitMQ  # noqa: E402

HEARTBEAT = 2


def pytest_addoption(parser):
    parser.addoption(
        "--rabbitmq",
        choices=RELEASES,
        help="the RabbitMQ release of the test nodes (default: $WORKQUEUE_RABBITMQ, else system)",
    )


def pytest_configure(config):
    # One release for the whole run: the session's node, and the nodes scripts start (exercises, clusters).
    if config.getoption("--rabbitmq"):
        os.environ["WORKQUEUE_RABBITMQ"] = config.getoption("--rabbitmq")


# The modules that mark themselves xdist_group, so that one worker runs each group in a row: a 3-node
# cluster and a run of every experiment start once, and one worker per release waits for the whole machine.
GROUPED_MODULES = ("tests/test_bench.py", "tests/test_cluster.py", "tests/test_exercises.py")


def pytest_xdist_node_collection_finished(node, ids):
    """Under `--dist loadgroup`, xdist marks each grouped test's id with its group (`...@cluster`);
    some pytest and xdist releases together silently do not (pytest 9.2 with xdist 3.8), and every
    worker would then start a cluster of its own: refuse to run instead."""
    ungrouped = [i for i in ids if i.startswith(GROUPED_MODULES) and "@" not in i]
    if ungrouped and node.config.getvalue("dist") == "loadgroup":
        raise pytest.UsageError(
            f"this pytest-xdist does not group {ungrouped[0]} (xdist_group): install requirements-dev.txt's versions"
        )


def pytest_report_header(config):
    rabbitmq = RabbitMQ()
    return f"rabbitmq: {rabbitmq.release} ({rabbitmq.version()})"


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    cacert, certfile, keyfile = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca.cert_pem.write_to_path(str(cacert))
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    return str(cacert), str(certfile), str(keyfile)


@pytest.fixture(scope="session")
def broker(tls_files):
    node = BrokerNode(name="test", heartbeat=HEARTBEAT, tls=tls_files, rabbitmq=RabbitMQ()).start()
    yield node
    node.destroy()


# One lock for the whole machine, shared by every pytest process here: the xdist workers of one run,
# and the runs of other releases that ./run.sh test starts beside it.
WHOLE_MACHINE_LOCK = Path(tempfile.gettempdir()) / "workqueue-tests-whole-machine.lock"


@pytest.fixture(scope="module")
def whole_machine():
    """Held by a module that would be too much beside its like (a 3-node cluster, the benchmark): two
    of them at once would start six nodes, or load both cores, on a 2-core machine. Other tests run on
    meanwhile; they are the load any test here must stand. The wait is bounded here, not by
    pytest-timeout, whose clock those modules keep for their tests alone (func_only)."""
    try:  # read-only, and created only if missing: /tmp's sticky bit refuses to open another user's file to write
        lock = os.open(WHOLE_MACHINE_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        lock = os.open(WHOLE_MACHINE_LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        wait_until(lambda: take_lock(lock), timeout=1800, what="the lock of the whole machine", every=0.5)
        yield
    finally:
        os.close(lock)  # releases it; so does the death of this process


def take_lock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@pytest.fixture
def running_broker(broker):
    """The session's node, started again after the test if the test stopped it."""
    yield broker
    if not broker.pid() or not Path(f"/proc/{broker.pid()}").exists():
        broker.start()


# A test's queues are deleted after it, so that a node restarted later does not recover them all: the
# names known in advance at once, over AMQP; the others (wait queues for other delays, delay queues) by a
# sweep that lists the node's queues after every SWEEP_EVERY tests. Listing them takes rabbitmqctl, which
# starts an Erlang VM (half a second of CPU): after every test, it was a third of the suite's CPU time.
SWEEP_EVERY = 20
queues_to_sweep: list[str] = []  # the names of this process's tests since the last sweep (one xdist worker)
# The delays of the wait queues a worker declares with its default --retry-delays and --max-retries.
DEFAULT_WAIT_DELAYS = worker.wait_queues(worker.make_argument_parser().parse_args(["--queue", "q"])).values()


@pytest.fixture
def queue(request, broker):
    """A queue name of this test's own; removed (with its dead-letter and wait queues) afterwards."""
    name = "t_" + re.sub(r"\W+", "_", request.node.name)[:80]
    yield name
    waits = [workqueue.wait_queue(name, delay) for delay in DEFAULT_WAIT_DELAYS]
    delete_queues(broker, [name, workqueue.dead_letter_queue(name), *waits])
    queues_to_sweep.append(name)
    if len(queues_to_sweep) >= SWEEP_EVERY:
        try:
            listed = broker.rabbitmqctl("list_queues", "name", "--quiet", "--no-table-headers").split()
        except (BrokerError, subprocess.TimeoutExpired):  # the node is down (the test stopped it): next time
            return
        derived = tuple(test + "." for test in queues_to_sweep)  # name.dlq, name.retry.0.5s, name.delay.3s
        left = [q for q in listed if q in queues_to_sweep or q.startswith(derived)]
        queues_to_sweep.clear()  # (what a failed delete leaves, a later sweep does not see: rare, and harmless)
        delete_queues(broker, left)


def delete_queues(broker: BrokerNode, names: list[str]) -> None:
    """Delete queues (a missing one too: RabbitMQ does not mind), if the node answers."""
    try:
        with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
            channel = connection.channel()
            for name in names:
                channel.queue_delete(name)
    except pika.exceptions.AMQPError:
        pass


@pytest.fixture
def env(broker):
    """The environment the scripts run in: the test broker in AMQP_URL."""
    return {**os.environ, "AMQP_URL": broker.url, "PYTHONUNBUFFERED": "1", "DOT_SECONDS": "0.1"}


def run_script(script: str, *args: str, env: dict, timeout: float = 60, stdin: str | None = None):
    """Run a script to the end, as a user would, and return the finished process.

    It runs in a process group of its own: if it overruns `timeout` (or the test is stopped), the
    group gets Ctrl+C and 10 s to clean up, then is killed, so the workers an experiment started do
    not outlive it and load the tests that follow."""
    with subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        env=env,
        cwd=ROOT,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:  # say what it was doing: its output so far
            kill_group(process, grace=10)
            stdout, stderr = process.communicate()
            raise AssertionError(
                f"{script} overran {timeout:g}s; its last output:\n{stdout[-3000:]}\n{stderr[-2000:]}"
            ) from None
        except BaseException:  # pytest-timeout's, or a stop
            kill_group(process, grace=10)
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kill_group(process: subprocess.Popen, grace: float = 0) -> None:
    """SIGKILL a process started with start_new_session=True, and everything it started; with a
    `grace`, first SIGINT (Ctrl+C) and that long for it to stop what it started elsewhere."""
    if grace:
        try:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


class Script:
    """A script running in the background, its output collected line by line."""

    def __init__(self, script: str, *args: str, env: dict, cwd: Path = ROOT, stdin=None):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / script), *args],
            env=env,
            cwd=cwd,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # stop() kills what it started too
        )
        self.lines: list[str] = []
        self.arrived: list[float] = []  # time.monotonic() when each line was read
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.arrived.append(time.monotonic())
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    @property
    def output(self) -> str:
        with self.changed:
            return "\n".join(self.lines)

    def times(self, pattern: str) -> list[float]:
        """When each line matching `pattern` arrived (time.monotonic())."""
        with self.changed:
            return [at for at, line in zip(self.arrived, self.lines) if re.search(pattern, line)]

    def count(self, pattern: str) -> int:
        with self.changed:
            return sum(1 for line in self.lines if re.search(pattern, line))

    def wait_for(self, pattern: str, timeout: float = 30, count: int = 1) -> None:
        """Wait until `count` lines match `pattern`; fail with the output so far if they don't."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while sum(1 for line in self.lines if re.search(pattern, line)) < count:
                left = deadline - time.monotonic()
                if left <= 0 or not self.reader.is_alive():
                    raise AssertionError(f"no {count}x {pattern!r} within {timeout}s; output:\n" + self.output)
                self.changed.wait(min(left, 0.2))

    def wait(self, timeout: float = 30) -> int:
        """Wait for the process to exit and for its last line to be read; return its exit code."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s; output so far:\n{self.output[-3000:]}") from None
        self.reader.join(timeout=5)
        return code

    def send(self, text: str) -> None:
        """Write to the script's standard input (started with stdin=subprocess.PIPE), at once."""
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """At the end of a test: kill it and whatever it started (a worker's task processes)."""
        kill_group(self.proc)


@pytest.fixture
def start(env):
    """start('worker.py', ...) runs a script in the background; all are killed after the test."""
    started: list[Script] = []

    def start_script(script: str, *args: str, env: dict = env, cwd: Path = ROOT, stdin=None) -> Script:
        process = Script(script, *args, env=env, cwd=cwd, stdin=stdin)
        started.append(process)
        return process

    yield start_script
    for process in started:
        process.stop()


class Gate:
    """A --task that keeps every task running until the test opens the gate: for a test that must see
    tasks running at the broker (rabbitmqctl takes seconds under load), with no race against their end.

        worker = start_worker(start, queue, *gate.task, cwd=gate.folder)
        ...
        gate.open()
    """

    MODULE = (
        "import os, time\n"
        "def task(body):\n"
        "    deadline = time.monotonic() + 120  # no test holds them longer: a worker never hangs for good\n"
        "    while not os.path.exists('gate.open') and time.monotonic() < deadline:\n"
        "        time.sleep(0.02)\n"
    )

    def __init__(self, folder: Path):
        self.folder = folder
        (folder / "gated.py").write_text(self.MODULE)
        self.task = ("--task", "gated:task")

    def open(self) -> None:
        (self.folder / "gate.open").touch()


@pytest.fixture
def gate(tmp_path) -> Gate:
    return Gate(tmp_path)


def start_worker(start, queue: str, *args: str, name: str = "w1", **kwargs) -> Script:
    """A worker on `queue`, once it says it is waiting for messages."""
    worker = start("worker.py", "--queue", queue, "--name", name, *args, **kwargs)
    worker.wait_for(r"Waiting for messages")
    return worker


def publish(env: dict, queue: str, *messages: str, extra: tuple[str, ...] = ()) -> None:
    """Send tasks with new_task.py --file, as a user would, and check it confirmed them all."""
    result = run_script("new_task.py", "--queue", queue, "--file", "-", *extra, env=env, stdin="\n".join(messages))
    assert result.returncode == 0, result.stderr
    assert f"Sent {len(messages):,} message{'' if len(messages) == 1 else 's'}, all confirmed" in result.stdout


def done_tasks(*workers: Script) -> list[str]:
    """The tasks the workers finished (acked), as they reported them."""
    return [m for w in workers for m in re.findall(r"\[x\] Done '([^']*)'", w.output)]


def wait_for_counts(broker: BrokerNode, queue: str, ready: int, unacked: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (counts := broker.queue_counts(queue)) != (ready, unacked):
        if time.monotonic() > deadline:
            raise AssertionError(f"{queue}: (ready, unacked) is {counts}, expected {(ready, unacked)}")
        time.sleep(0.3)


def take_all(url: str, queue: str) -> list[tuple[bytes, pika.BasicProperties]]:
    """Take every message off a queue (acking them): (body, properties) pairs, in queue order."""
    taken = []
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue)
            if method is None:
                return taken
            channel.basic_ack(method.delivery_tag)
            taken.append((body, properties))


def get_all(broker: BrokerNode, queue: str) -> list[tuple[bytes, dict]]:
    """Take every message off a queue (acking them): (body, headers) pairs."""
    return [(body, properties.headers or {}) for body, properties in take_all(broker.url, queue)]


def rabbitmq_version(node: BrokerNode) -> tuple[int, int]:
    """The node's RabbitMQ release, (4, 3) say: where the releases differ, a test checks what each does."""
    status = json.loads(node.rabbitmqctl("status", "--formatter", "json"))
    major, minor = status["rabbitmq_version"].split(".")[:2]
    return int(major), int(minor)


def wait_until(condition, timeout: float, what: str, every: float = 0.05, details=lambda: "") -> None:
    """Poll `condition` every `every` seconds until it holds; fail after `timeout` seconds, with `details()`.
    A condition that reads a long output (60,000 lines) wants a longer `every`: it would take a core of its own."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; {details()}")
        time.sleep(every)


def ready_count(url: str, queue: str) -> int:
    """Messages ready in a queue, live (a passive declare, not rabbitmqctl's periodic figure); 0 if none."""
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        try:
            return connection.channel().queue_declare(queue, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code == 404:  # not declared yet
                return 0
            raise
