"""The one task every system in the peer benchmark runs: sleep per dot, then count itself done.

Each finished task appends one byte to $BENCH_DONE_FILE (O_APPEND: one write is atomic, from
any thread or process), so the benchmark can check that every task was done, and done once.
"""

from __future__ import annotations

import os
import time

DOT_SECONDS = float(os.environ.get("BENCH_DOT_SECONDS", "0"))
_done = None


def run(body) -> None:
    global _done
    dots = body.count(b"." if isinstance(body, bytes) else ".")
    if dots and DOT_SECONDS:
        time.sleep(dots * DOT_SECONDS)
    if _done is None:
        _done = os.open(os.environ["BENCH_DONE_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(_done, b".")
