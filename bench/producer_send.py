#!/usr/bin/env python
"""The library's producer, timed by bench.py: every line of FILE sent to QUEUE, either by 16 threads
sharing one Producer (each send() waits for its own confirm) or in one send_many() (confirms pipelined).

    python bench/producer_send.py URL QUEUE FILE threads|bulk
"""

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from workqueue import Producer

THREADS = 16


def main() -> None:
    url, queue, path, mode = sys.argv[1:5]
    lines = Path(path).read_bytes().splitlines()
    with Producer(url, queue, timeout=120) as producer:
        if mode == "bulk":
            ids = producer.send_many(lines)
        else:
            ids = []  # list.append is atomic

            def send(share: list[bytes]) -> None:
                for line in share:
                    ids.append(producer.send(line))

            threads = [threading.Thread(target=send, args=(lines[n::THREADS],)) for n in range(THREADS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    if len(set(ids)) != len(lines):
        sys.exit(f"{len(set(ids))} ids for {len(lines)} lines")


if __name__ == "__main__":
    main()
