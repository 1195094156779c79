"""A worker's own time per task at prefetch 1: from a delivery reaching it to its ack leaving it.

At prefetch 1 a drain alternates between the worker (delivery in -> ack out) and the broker (ack in
-> next delivery out). The drain rate mixes both, and the broker's half swings with its disk writes;
this splits them, from the kernel's timestamps of the packets on the loopback interface (needs root
for a packet socket). Linux only.
"""

from __future__ import annotations

import socket
import statistics
import struct
import threading
from collections import Counter
from collections.abc import Callable

SO_TIMESTAMPNS = 35  # Linux: the kernel's receive time of each packet, in nanoseconds
ETH_P_ALL = 0x0003


def can_capture() -> bool:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL)).close()
        return True
    except (OSError, AttributeError):
        return False


class Capture:
    """(time, from_broker, client_port) of every loopback TCP segment with a payload to or from `port`."""

    def __init__(self, port: int):
        self.port = port
        self.segments: list[tuple[float, bool, int]] = []
        self.stop = threading.Event()
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
        self.sock.bind(("lo", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Capture:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                frame, ancillary, _, address = self.sock.recvmsg(65535, 64)
            except TimeoutError:
                continue
            if address[2] == socket.PACKET_OUTGOING:  # loopback shows each packet twice
                continue
            stamps = [data for _, kind, data in ancillary if kind == SO_TIMESTAMPNS]
            ip = frame[14:]  # after the (all-zero) Ethernet header of lo
            if not stamps or ip[9] != socket.IPPROTO_TCP:
                continue
            ip_length, total = (ip[0] & 15) * 4, struct.unpack("!H", ip[2:4])[0]
            tcp = ip[ip_length:]
            source, destination = struct.unpack("!HH", tcp[:4])
            if total - ip_length - (tcp[12] >> 4) * 4 > 0 and self.port in (source, destination):
                seconds, nanoseconds = struct.unpack("qq", stamps[0][:16])
                from_broker = source == self.port
                self.segments.append((seconds + nanoseconds / 1e9, from_broker, destination if from_broker else source))


def turnarounds(port: int, drain: Callable[[], object]) -> tuple[float, float]:
    """Median microseconds (worker: delivery in -> ack out, broker: ack in -> next delivery out)
    on the busiest connection to `port` while `drain()` runs."""
    with Capture(port) as capture:
        drain()
    busiest = Counter(client for _, _, client in capture.segments).most_common(1)[0][0]
    flow = [(at, from_broker) for at, from_broker, client in capture.segments if client == busiest]
    worker, broker = [], []
    for (before, from_broker), (after, then_from_broker) in zip(flow, flow[1:]):
        if from_broker != then_from_broker:
            (worker if from_broker else broker).append(after - before)
    trim = len(worker) // 20  # leave out start-up and shut-down
    return (
        statistics.median(worker[trim : len(worker) - trim]) * 1e6,
        statistics.median(broker[trim : len(broker) - trim]) * 1e6,
    )
