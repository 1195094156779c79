"""Dramatiq's side of the peer benchmark: the broker and its one actor (acks after the task)."""

from __future__ import annotations

import os

import dramatiq
import peer_tasks
from dramatiq.brokers.rabbitmq import RabbitmqBroker

dramatiq.set_broker(RabbitmqBroker(url=os.environ["BENCH_AMQP_URL"]))


@dramatiq.actor(queue_name=os.environ.get("BENCH_QUEUE", "default"), max_retries=0)
def run(body: str) -> None:
    peer_tasks.run(body)


if __name__ == "__main__":  # python peer_dramatiq.py FILE: send one task per line, with Dramatiq's own API
    import sys

    with open(sys.argv[1]) as lines:
        for line in lines:
            run.send(line.rstrip("\n"))
