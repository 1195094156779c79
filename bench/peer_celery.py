"""Celery's side of the peer benchmark: the app, its one task, acks after the task."""

from __future__ import annotations

import os

import peer_tasks
from celery import Celery

app = Celery("peer_celery", broker=os.environ["BENCH_AMQP_URL"])
app.conf.update(
    task_acks_late=True,  # ack after the task, as ours does
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH_MULTIPLIER", "1")),
    task_default_queue=os.environ.get("BENCH_QUEUE", "celery"),
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_enable_remote_control=False,  # no pidbox queue: several workers on one host need no names
)


@app.task(name="run")
def run(body: str) -> None:
    peer_tasks.run(body)


if __name__ == "__main__":  # python peer_celery.py FILE: send one task per line, with Celery's own API
    import sys

    with open(sys.argv[1]) as lines:
        for line in lines:
            run.delay(line.rstrip("\n"))
