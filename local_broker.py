"""Throwaway RabbitMQ nodes for the demo and the tests.

A node of our own runs from the installed ``rabbitmq-server`` scripts, in a
temporary directory, on free ports, with its own Erlang cookie: it can be
stopped, restarted and killed without touching any other broker.

    python local_broker.py               # start one node, print its URL, stop on Ctrl+C
    python local_broker.py --cluster 3   # a 3-node cluster, its URLs comma-separated
    python local_broker.py restart       # from another terminal: restart the running node(s)
    python local_broker.py ctl list_queues   # rabbitmqctl, aimed at the running node
    python local_broker.py --rabbitmq 4.3    # a node of RabbitMQ 4.3 (./run.sh broker 4.3 installs it)

``--rabbitmq`` picks the release: ``system`` (the installed rabbitmq-server), or
``4.0`` / ``4.3``, which run from a Debian root (trixie's and sid's packages) under
``chroot``, on the host's loopback like any other node. ``./run.sh`` builds the
roots in /var/cache/workqueue (root only: chroot needs it). WORKQUEUE_RABBITMQ
sets the default for every script and test that starts a node.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import workqueue

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
# Releases other than the system's, each from a Debian release's packages, in a root of its own.
DEBIAN_RELEASES = {"4.0": "trixie", "4.3": "sid"}
ROOTS = Path("/var/cache/workqueue")
RELEASES = ("system", *DEBIAN_RELEASES)


class BrokerError(workqueue.WorkQueueError):
    """A throwaway node could not be started or stopped (one line and exit 1, as other errors)."""


def default_release() -> str:
    """The release a node runs when none is named: $WORKQUEUE_RABBITMQ, else the system's."""
    return os.environ.get("WORKQUEUE_RABBITMQ") or "system"


class RabbitMQ:
    """Where a node's rabbitmq-server comes from: the system's, or a Debian root run under chroot.

    A node in a root sees only the root's files: its directory lives in the root's /tmp, and
    `inside()` turns a path of ours into the path the node sees."""

    def __init__(self, release: str | None = None):
        self.release = release or default_release()
        if self.release not in RELEASES:
            raise workqueue.UsageError(f"unknown RabbitMQ release {self.release!r}: choose from {', '.join(RELEASES)}")
        self.root = ROOTS / f"rabbitmq-{self.release}" if self.release in DEBIAN_RELEASES else None

    def command(self, program: str, *args: str) -> list[str]:
        """The command line that runs one of RabbitMQ's scripts (rabbitmq-server, rabbitmqctl)."""
        if self.root:
            return ["chroot", str(self.root), str(RABBITMQ_BIN / program), *args]
        return [str(RABBITMQ_BIN / program), *args]

    def temp_dir(self, prefix: str) -> Path:
        """A new directory for a node: in the root's /tmp, if the node runs in a root."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root / "tmp" if self.root else None))

    def inside(self, path: Path) -> str:
        """A path of ours as the node sees it."""
        return "/" + str(path.relative_to(self.root)) if self.root else str(path)

    def check(self) -> None:
        """Fail with one line saying how to install this release, if it is not; mount the root's /proc."""
        server = RABBITMQ_BIN / "rabbitmq-server"
        if not (self.root / server.relative_to("/") if self.root else server).exists():
            if self.root:
                raise BrokerError(
                    f"RabbitMQ {self.release} is not installed here ({self.root} is missing); "
                    f"install it with: ./run.sh broker {self.release}"
                )
            raise BrokerError(f"rabbitmq-server is not installed ({RABBITMQ_BIN} is missing)")
        if self.root and not (self.root / "proc" / "self").exists():
            # Erlang reads its memory use from /proc: a root needs one (mounts do not survive a reboot).
            mounted = subprocess.run(
                ["mount", "-t", "proc", "proc", str(self.root / "proc")], capture_output=True, text=True, check=False
            )
            if mounted.returncode != 0 and not (self.root / "proc" / "self").exists():  # not mounted meanwhile
                raise BrokerError(f"cannot mount /proc in {self.root}: {mounted.stderr.strip()} (it needs root)")

    def version(self) -> str:
        """The installed rabbitmq-server's version, as its package says (4.3.6, say)."""
        query = ["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"]
        try:
            found = subprocess.run(
                ["chroot", str(self.root), *query] if self.root else query, capture_output=True, text=True, check=False
            )
        except OSError:  # no dpkg-query (not a Debian system), or no chroot
            return "(version unknown)"
        return found.stdout.split("-")[0] or "(version unknown)"


def ephemeral_ports() -> range:
    """The ports the kernel hands out as the local end of outgoing connections."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port() -> int:
    """A port nobody listens on right now, outside the ephemeral range.

    A port from the kernel's own choice (bind to 0) is an ephemeral one: before the
    node binds it, any client's outgoing connection can take it as its local end,
    and the node dies of eaddrinuse (seen in CI, with hundreds of test connections
    a minute). Outside that range only listeners take ports: below it (Linux's
    default range starts at 32768), else above it (a range that starts low).
    """
    ephemeral = ephemeral_ports()
    ports = range(10000, ephemeral.start)
    if len(ports) < 1000:
        ports = range(ephemeral.stop, 65536)
    if len(ports) < 1000:  # the range is nearly every port: no port is safe, take any
        ports = range(10000, 65536)
    for _ in range(200):
        port = random.choice(ports)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise BrokerError(f"no free port between {ports.start} and {ports.stop - 1}")


def amqp_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something on host:port speaks AMQP 0-9-1 (answers our protocol header)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"  # the first byte of a Connection.Start frame
    except OSError:
        return False


class BrokerNode:
    """One RabbitMQ node in a directory of its own.

    ``heartbeat`` is the interval the broker proposes (seconds); ``tls`` is an
    optional (cacert, cert, key) triple that opens an amqps listener too.
    """

    def __init__(
        self,
        name: str = "workqueue",
        heartbeat: int = 60,
        tls: tuple[str, str, str] | None = None,
        base_dir: str | None = None,
        rabbitmq: RabbitMQ | str | None = None,
    ):
        self.rabbitmq = rabbitmq if isinstance(rabbitmq, RabbitMQ) else RabbitMQ(rabbitmq)
        self.base = Path(base_dir) if base_dir else self.rabbitmq.temp_dir(f"rabbit-{name}-")
        self.base.mkdir(parents=True, exist_ok=True)
        self.nodename = f"{name}{os.getpid()}@localhost"
        self.pid_file = self.base / "node.pid"
        self.crash_dump = self.base / "erl_crash.dump"  # what an Erlang VM that dies leaves (ERL_CRASH_DUMP)
        self._heartbeat, self._tls = heartbeat, tls
        self.answered = False  # once it has, clients know its port: a restart keeps it
        self._log_sizes: dict[Path, int] = {}  # where each log ended when the node was last launched
        self._choose_ports()

    def _choose_ports(self) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.tls_port = free_port() if self._tls else None
        self._write_config(self._heartbeat, self._tls)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _write_config(self, heartbeat: int, tls: tuple[str, str, str] | None) -> None:
        (self.base / "home").mkdir(parents=True, exist_ok=True)
        conf = [
            f"listeners.tcp.default = 127.0.0.1:{self.port}",
            f"heartbeat = {heartbeat}",
            "disk_free_limit.absolute = 10MB",
            "loopback_users = none",
        ]
        if tls:
            tls_dir = self.base / "tls"  # in the node's directory: a node in a root sees only the root
            tls_dir.mkdir(exist_ok=True)
            cacert, cert, key = (shutil.copy(path, tls_dir) for path in tls)
            inside = self.rabbitmq.inside
            conf += [
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {inside(Path(cacert))}",
                f"ssl_options.certfile = {inside(Path(cert))}",
                f"ssl_options.keyfile = {inside(Path(key))}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        (self.base / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        # Queue counts of quorum queues refresh every 5 s by default; tests want them live.
        # A consumer timeout is checked every minute by default; tests want it checked every second.
        (self.base / "advanced.config").write_text(
            "[{rabbit, [{quorum_tick_interval, 200}, {channel_tick_interval, 1000}]}].\n"
        )
        (self.base / "enabled_plugins").write_text("[].\n")

    def environment(self) -> dict[str, str]:
        """The variables that make rabbitmq-server and rabbitmqctl this node's (paths as the node sees them)."""
        base = self.rabbitmq.inside(self.base)
        env = dict(os.environ)
        env.update(
            HOME=f"{base}/home",
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=f"{base}/mnesia",
            RABBITMQ_LOG_BASE=f"{base}/log",
            RABBITMQ_CONFIG_FILE=f"{base}/rabbitmq",
            RABBITMQ_ADVANCED_CONFIG_FILE=f"{base}/advanced.config",
            RABBITMQ_ENABLED_PLUGINS_FILE=f"{base}/enabled_plugins",
            RABBITMQ_PID_FILE=f"{base}/node.pid",
            ERL_CRASH_DUMP=f"{base}/{self.crash_dump.name}",  # with the node, removed with it
        )
        return env

    def rabbitmqctl(self, *args: str, timeout: float = 60) -> str:
        """Run rabbitmqctl against this node and return what it printed."""
        result = subprocess.run(
            self.rabbitmq.command("rabbitmqctl", "-n", self.nodename, *args),
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise BrokerError(f"rabbitmqctl {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    def queue_counts(self, queue: str) -> tuple[int, int] | None:
        """(messages_ready, messages_unacknowledged) as `rabbitmqctl list_queues` shows them; None if no such queue."""
        out = self.rabbitmqctl(
            "list_queues", "name", "messages_ready", "messages_unacknowledged", "--quiet", "--no-table-headers"
        )
        for line in out.splitlines():
            name, ready, unacked = line.split("\t")
            if name == queue:
                return int(ready), int(unacked)
        return None

    def start(self, timeout: float = 90) -> BrokerNode:
        """Start the node and return once it completes an AMQP handshake; a node that fails is killed."""
        try:
            self.launch()
            return self.wait_ready(timeout)
        except BaseException:
            self.kill()  # never leave a half-started node behind
            raise

    def launch(self) -> None:
        """Start the node in the background (see wait_ready)."""
        self.rabbitmq.check()
        self.pid_file.unlink(missing_ok=True)
        self.crash_dump.unlink(missing_ok=True)
        self._log_sizes = {log: log.stat().st_size for log in (self.base / "log").glob("*.log")}  # this boot's after
        subprocess.run(
            self.rabbitmq.command("rabbitmq-server", "-detached"),
            env=self.environment(),
            cwd=self.base,  # where Erlang writes crash dumps (MnesiaCore.*, erl_crash.dump): removed with the node
            check=True,
            timeout=60,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout: float = 90, tries: int = 3) -> BrokerNode:
        """Return once the node completes an AMQP handshake.

        A node that dies on its first boot gets new ports and another try: a port
        free when chosen can be taken before the node binds it. Once it has
        answered, its ports are known to clients, and a node that dies says why."""
        deadline = time.monotonic() + timeout
        while not amqp_answers("127.0.0.1", self.port):
            if self._died():
                tries -= 1
                if self.answered or tries == 0:
                    raise BrokerError(f"node {self.nodename} stopped as it started: {self._why_it_stopped()}")
                self.kill()  # a VM that wrote a crash dump may not have exited yet (its name still taken)
                shutil.rmtree(self.base / "mnesia", ignore_errors=True)  # nothing in it yet
                self._choose_ports()
                self.launch()
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"node {self.nodename} did not answer AMQP in {timeout:.0f}s: {self._why_it_stopped()}"
                )
            time.sleep(0.2)
        self.answered = True
        return self

    def _died(self) -> bool:
        """True when the VM wrote a crash dump, or wrote its pid and is gone."""
        pid = self.pid()
        return self.crash_dump.exists() or (pid is not None and not Path(f"/proc/{pid}").exists())

    def _why_it_stopped(self) -> str:
        """Why the node stopped, as its log says (eaddrinuse, say), and where to look."""
        errors = []
        for log in sorted((self.base / "log").glob("*.log")):
            with contextlib.suppress(OSError), log.open("rb") as lines:
                lines.seek(self._log_sizes.get(log, 0))
                errors += [line for line in lines.read().decode(errors="replace").splitlines() if "[error]" in line]
        # The first reason is the cause ({listen_error, ..., eaddrinuse}); later ones are the shutdown it led to.
        reason = next((line for line in errors if "reason:" in line), errors[-1] if errors else "")
        where = f"see {self.base}/log" + (f" and {self.crash_dump}" if self.crash_dump.exists() else "")
        return f"{reason.split('> ', 1)[-1].strip()[:300]}; {where}" if reason else where

    def stop(self) -> None:
        """Stop the node gracefully (as `rabbitmqctl stop` does) and wait until it is gone."""
        pid = self.pid()
        try:
            self.rabbitmqctl("stop", timeout=120)
        except (BrokerError, subprocess.TimeoutExpired):
            self.kill()
        self._wait_gone(pid)

    def kill(self) -> None:
        """kill -9 the node's Erlang VM: no shutdown, no goodbye to clients."""
        pid = self.pid()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._wait_gone(pid)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _wait_gone(self, pid: int | None, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = pid is not None and Path(f"/proc/{pid}").exists()
            if not alive and not amqp_answers("127.0.0.1", self.port, timeout=0.2):
                return
            time.sleep(0.1)
        raise BrokerError(f"node {self.nodename} did not stop within {timeout:.0f}s")

    def destroy(self) -> None:
        """Stop the node if it runs and remove its directory."""
        if self.pid() and Path(f"/proc/{self.pid()}").exists():
            self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


class BrokerCluster:
    """A local RabbitMQ cluster: nodes of their own sharing one Erlang cookie, joined to the first."""

    def __init__(self, size: int = 3, name: str = "cluster", rabbitmq: RabbitMQ | str | None = None):
        rabbitmq = rabbitmq if isinstance(rabbitmq, RabbitMQ) else RabbitMQ(rabbitmq)
        self.base = rabbitmq.temp_dir(f"rabbit-{name}-")
        cookie = secrets.token_hex(20)
        self.nodes = [
            BrokerNode(name=f"{name}{n}x", base_dir=str(self.base / f"node{n}"), rabbitmq=rabbitmq)
            for n in range(1, size + 1)
        ]
        for node in self.nodes:
            cookie_file = node.base / "home" / ".erlang.cookie"
            cookie_file.write_text(cookie)
            cookie_file.chmod(0o400)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 120) -> BrokerCluster:
        """Start every node, join the others to the first, and wait until all run as one cluster.

        If any step fails, every node is killed: nothing is left running."""
        try:
            for node in self.nodes:
                node.launch()
            for node in self.nodes:
                node.wait_ready(timeout)
            first = self.nodes[0].nodename
            for node in self.nodes[1:]:
                node.rabbitmqctl("stop_app")
                node.rabbitmqctl("join_cluster", first)
                node.rabbitmqctl("start_app")
            self.wait_running(len(self.nodes), timeout)
        except BaseException:
            for node in self.nodes:
                node.kill()
            raise
        return self

    def running_nodes(self, asking: BrokerNode | None = None) -> list[str]:
        """Names of the cluster's running nodes, as `rabbitmqctl cluster_status` reports them."""
        out = (asking or self.nodes[0]).rabbitmqctl("cluster_status", "--formatter", "json")
        return json.loads(out)["running_nodes"]

    def wait_running(self, count: int, timeout: float = 120, asking: BrokerNode | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if len(self.running_nodes(asking)) == count:
                    return
            except (BrokerError, subprocess.TimeoutExpired, ValueError):
                pass
            if time.monotonic() > deadline:
                raise BrokerError(f"the cluster did not reach {count} running nodes within {timeout:.0f}s")
            time.sleep(0.5)

    def destroy(self) -> None:
        for node in reversed(self.nodes):
            node.destroy()
        shutil.rmtree(self.base, ignore_errors=True)


class TcpProxy:
    """A TCP forwarder between clients and a broker, so that a test can cut connections without
    touching the broker (pika's own acceptance tests do the same), or freeze them: a broker that
    stops answering while the connection stays open. Its threads are daemons: it dies with us."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.frozen: set[socket.socket] = set()  # sockets whose data is read and thrown away
        self.lock = threading.Lock()
        self.accepted = 0
        self.hang_ups = 0  # how many of the next connections to hang up on during the login
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/%2F"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, upstream]
                self.accepted += 1
                hang_up, self.hang_ups = self.hang_ups > 0, max(0, self.hang_ups - 1)
            # The client speaks first (the protocol header); its second write is its login (Start-Ok).
            hang_up_after = 1 if hang_up else None
            for source, sink, writes in ((client, upstream, hang_up_after), (upstream, client, None)):
                threading.Thread(target=self._pipe, args=(source, sink, writes), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, writes: int | None = None) -> None:
        """Forward source to sink; after `writes` of them, end both at the next one (None: never)."""
        try:
            while data := source.recv(65536):
                if writes is not None:
                    if writes == 0:
                        break
                    writes -= 1
                if source not in self.frozen:
                    sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Reset every connection through the proxy, as a network failure would."""
        with self.lock:
            connections, self.connections = self.connections, []
        for sock in connections:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()  # linger 0: the peer sees a reset, not a clean close
            except OSError:
                pass

    def hang_up_at_login(self, connections: int) -> None:
        """The next `connections` connections end as the client sends its login, as a broker that is
        stopping does: pika cannot tell that from a refused password (ProbableAuthenticationError)."""
        with self.lock:
            self.hang_ups = connections

    def freeze(self) -> None:
        """From now on, nothing passes either way on the open connections; new ones work."""
        with self.lock:
            self.frozen.update(self.connections)

    def close(self) -> None:
        self.listener.close()
        self.cut()


EXAMPLES = """\
examples:
  python local_broker.py                  # one node; Ctrl+C stops and removes it
  python local_broker.py --cluster 3      # three nodes joined in one cluster
  python local_broker.py restart          # from another terminal: restart the running node(s)
  python local_broker.py stop             # stop it, or the node a killed one (kill -9) left running
  python local_broker.py ctl list_queues name messages_ready messages_unacknowledged
"""

# Where a running `local_broker.py` says who it is, for `restart` and `ctl` in other terminals.
# It lives where only this user can write ($XDG_RUNTIME_DIR, else ~/.cache/workqueue): in a shared /tmp,
# another user could plant a file that points `ctl` at a node and an Erlang cookie of theirs.
STATE_NAME = "workqueue-local-broker.json"


def state_file() -> Path:
    """This user's state file, in a directory that is theirs alone: $XDG_RUNTIME_DIR if it is, else
    ~/.cache/workqueue (made so if new). A directory others could write to is never used."""
    candidates = [os.environ.get("XDG_RUNTIME_DIR"), os.path.join(os.path.expanduser("~"), ".cache", "workqueue")]
    for folder in (Path(c) for c in candidates if c and os.path.isabs(c)):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = folder.stat()
        except OSError:
            continue
        if info.st_uid == os.getuid() and not info.st_mode & 0o022:
            return folder / STATE_NAME
    raise BrokerError("found no directory of this user's alone for local_broker.py's state (XDG_RUNTIME_DIR, ~/.cache)")


def write_state(state: dict) -> None:
    """Note the running node(s) for `restart` and `ctl`; if that cannot be, say so: the node runs on."""
    try:
        target = state_file()
        partial = target.with_suffix(".tmp")
        partial.write_text(json.dumps(state))
        partial.replace(target)  # readers never see half a file
    except (OSError, BrokerError) as error:
        print(f"local_broker.py: `restart` and `ctl` will not find this node: {error}", file=sys.stderr, flush=True)


def read_state() -> dict:
    """What a local_broker.py wrote ({} if nothing, or not JSON)."""
    try:
        return json.loads(state_file().read_text())
    except (OSError, ValueError, BrokerError):
        return {}


def process_started(pid: object) -> str | None:
    """When a process started (its start time in /proc, in clock ticks): a PID reused later differs."""
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, ValueError, TypeError, IndexError):
        return None


def is_local_broker(state: dict) -> bool:
    """Whether the state's process is still the local_broker.py that wrote it (after a kill -9 the PID
    can be another process's): same PID, same start time, this user's."""
    pid = state.get("pid")
    try:
        owner = Path(f"/proc/{int(pid)}").stat().st_uid
    except (OSError, ValueError, TypeError):
        return False
    started = process_started(pid)
    return owner == os.getuid() and started is not None and started == state.get("started")


def running_state() -> dict:
    """What the running local_broker.py wrote, if it still runs; else a one-line error."""
    state = read_state()
    if is_local_broker(state):
        return state
    if state.get("nodes"):  # it wrote state and is gone without removing it: killed (kill -9, a crash)
        raise workqueue.BrokerUnreachable(
            "no local_broker.py is running; one was killed and its node may run on: "
            "python local_broker.py stop stops it"
        )
    raise workqueue.BrokerUnreachable(
        "no local_broker.py is running; start one in another terminal with: python local_broker.py"
    )


def noted(broker: BrokerNode | BrokerCluster, urls: str) -> dict:
    """Write the state file that `restart`, `ctl` and `stop` read: this process and its node(s)."""
    nodes = broker.nodes if isinstance(broker, BrokerCluster) else [broker]
    state = {
        "pid": os.getpid(),
        "started": process_started(os.getpid()),
        "urls": urls,
        "restarts": 0,
        "nodes": [
            {
                "nodename": node.nodename,
                "home": node.environment()["HOME"],
                "rabbitmq": node.rabbitmq.release,
                "base": str(node.base),  # for `stop`, if this process is killed and the node runs on
            }
            for node in nodes
        ],
    }
    write_state(state)
    return state


def serve(broker: BrokerNode | BrokerCluster, state: dict) -> None:
    """Wait for Ctrl+C (or SIGTERM); on SIGHUP (`local_broker.py restart`) restart every node in turn."""
    nodes = broker.nodes if isinstance(broker, BrokerCluster) else [broker]
    while signal.sigwait({signal.SIGINT, signal.SIGTERM, signal.SIGHUP}) == signal.SIGHUP:
        for node in nodes:
            print(f"Restarting {node.nodename} (stop, then start)...", file=sys.stderr, flush=True)
            node.restart()
            if isinstance(broker, BrokerCluster):
                broker.wait_running(len(nodes))
        state["restarts"] += 1
        write_state(state)
        print("Ready again, at the same URL", file=sys.stderr, flush=True)


def forget_state() -> None:
    """Remove the state file once our node(s) are gone, unless another local_broker.py wrote it since."""
    if read_state().get("pid") == os.getpid():
        with contextlib.suppress(OSError, BrokerError):
            state_file().unlink(missing_ok=True)


def restart(timeout: float = 300) -> int:
    """Ask the running local_broker.py to restart its node(s), and wait until it has."""
    state = running_state()
    os.kill(state["pid"], signal.SIGHUP)
    print("Restarting the local broker...", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            now = running_state()
        except workqueue.BrokerUnreachable:
            raise BrokerError("the local broker did not come back; see the terminal of local_broker.py") from None
        if now["restarts"] > state["restarts"]:
            print(" [x] Restarted the local broker; its URL is the same")
            return workqueue.EXIT_OK
    raise BrokerError(f"the local broker did not restart within {timeout:.0f}s")


def stop(timeout: float = 120) -> int:
    """Stop the running local_broker.py (it stops and removes its nodes); or, if one was killed, the
    nodes it left running (found in its state file), and remove them."""
    state = read_state()
    if is_local_broker(state):
        os.kill(state["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while is_local_broker(read_state()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if is_local_broker(read_state()):
            raise BrokerError(f"the local broker did not stop within {timeout:.0f}s")
        print(" [x] Stopped the local broker")
        return workqueue.EXIT_OK
    left = state.get("nodes") or []
    if not left:
        raise workqueue.BrokerUnreachable("no local_broker.py is running, and none left a node behind")
    for node in left:  # rabbitmqctl stop: the node's own clean stop (it may be gone already: then it fails)
        command = RabbitMQ(node.get("rabbitmq", "system")).command("rabbitmqctl", "-n", node["nodename"], "stop")
        environment = {**os.environ, "HOME": node["home"]}
        subprocess.run(command, env=environment, capture_output=True, timeout=timeout, check=False)
        base = Path(node.get("base") or "/nonexistent")
        if base.name.startswith("rabbit-"):  # a throwaway node's directory, as BrokerNode makes them
            shutil.rmtree(base, ignore_errors=True)
    with contextlib.suppress(OSError, BrokerError):
        state_file().unlink(missing_ok=True)
    print(f" [x] Stopped and removed {workqueue.plural(len(left), 'node')} that a killed local_broker.py left running")
    return workqueue.EXIT_OK


def ctl(arguments: list[str]) -> int:
    """rabbitmqctl with these arguments, run against the running local_broker.py's (first) node."""
    node = running_state()["nodes"][0]
    command = RabbitMQ(node.get("rabbitmq", "system")).command("rabbitmqctl", "-n", node["nodename"], *arguments)
    return subprocess.run(command, env={**os.environ, "HOME": node["home"]}, check=False).returncode


def main() -> int:
    if sys.argv[1:2] == ["ctl"]:  # everything after it is rabbitmqctl's, options included
        return ctl(sys.argv[2:])
    parser = argparse.ArgumentParser(
        usage="%(prog)s [-h] [--cluster N] [--rabbitmq RELEASE] [start | restart | stop]\n"
        "       %(prog)s ctl RABBITMQCTL-ARGUMENTS...",
        description="Start a throwaway RabbitMQ node (or a local cluster), print its URL, and stop and\n"
        "remove it on Ctrl+C. From another terminal, `restart` restarts it, and `ctl ...` runs\n"
        "rabbitmqctl against it (its first node).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=("start", "restart", "stop"),
        default="start",
        help="start a node and keep it until Ctrl+C (default), restart the one running, or stop it (or the "
        "node a killed one left running)",
    )
    parser.add_argument(
        "--cluster", type=workqueue.number(int, minimum=1), metavar="N", help="start N nodes joined in one cluster"
    )
    parser.add_argument(
        "--rabbitmq",
        choices=RELEASES,
        default=default_release(),
        metavar="RELEASE",
        help=f"which RabbitMQ: {', '.join(RELEASES)} (default: $WORKQUEUE_RABBITMQ, else %(default)s); "
        "./run.sh broker 4.3 installs 4.3",
    )
    args = parser.parse_args()
    if args.command == "restart":
        return restart()
    if args.command == "stop":
        return stop()
    left = read_state()
    if (
        not is_local_broker(left)
        and left.get("nodes")
        and any(
            amqp_answers(parts.hostname or "localhost", parts.port or 5672)
            for parts in (urlsplit(url) for url in str(left.get("urls", "")).split(",") if url)
        )
    ):  # starting now would lose the only record of that node
        raise workqueue.UsageError(
            "a local_broker.py was killed and left its node running: python local_broker.py stop stops it"
        )
    # Signals are taken by sigwait() in serve(), not by handlers: blocked from here on.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    rabbitmq = RabbitMQ(args.rabbitmq)
    rabbitmq.check()
    release = f"RabbitMQ {rabbitmq.version()}"
    if args.cluster:
        print(f"Starting a {args.cluster}-node {release} cluster (about a minute)...", file=sys.stderr, flush=True)
        broker = BrokerCluster(size=args.cluster, rabbitmq=rabbitmq)
    else:
        print(f"Starting a throwaway {release} node...", file=sys.stderr, flush=True)
        broker = BrokerNode(name="local", rabbitmq=rabbitmq)
    try:
        broker.start()
        urls = ",".join(broker.urls) if args.cluster else broker.url
        state = noted(broker, urls)  # before Ready: from then on `ctl`, `restart` and `stop` can find the node
        print(urls, flush=True)
        print(f"Ready: export AMQP_URL={urls}   (Ctrl+C stops and removes it)", file=sys.stderr, flush=True)
        print(
            "From another terminal: python local_broker.py ctl list_queues name messages_ready "
            "messages_unacknowledged\n"
            "                       python local_broker.py restart",
            file=sys.stderr,
            flush=True,
        )
        serve(broker, state)
    finally:
        broker.destroy()
        forget_state()
    return 0


if __name__ == "__main__":
    workqueue.run(main)
