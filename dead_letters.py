#!/usr/bin/env python
"""Read, replay or purge the dead-letter queue: the tasks that failed every retry.

worker.py moves a task to <queue>.dlq after its last retry, with headers that say
why (x-error), how often it was tried (x-retries), where it came from
(x-original-queue) and when it died (x-failed-at). Once the cause is fixed,
replay puts the tasks back on their queue with a fresh count of retries, and their ids (message_id).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import pika

import workqueue
from workqueue import policy

EXAMPLES = """\
examples:
  python dead_letters.py list                   # every dead task of task_queue.dlq, and why it died
  python dead_letters.py replay                 # put them all back on task_queue
  python dead_letters.py replay --limit 10      # only the first 10
  python dead_letters.py purge --queue emails   # drop the dead tasks of emails.dlq
"""

# What worker.py wrote on a task as it failed, and when it was due: a replayed task starts afresh (and without
# the broker's headers).
FAILURE_HEADERS = (
    "x-retries", "x-crashes", "x-error", "x-original-queue", "x-failed-at", "x-unfinished-runs", "x-due-at"
)  # fmt: skip


def make_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="List, replay or purge the dead tasks of a work queue (<queue>.dlq).",
        epilog=EXAMPLES + "\n" + workqueue.EXIT_CODES_HELP,
        formatter_class=workqueue.HelpFormatter,
    )
    parser.add_argument(
        "action",
        choices=("list", "replay", "purge"),
        help="list: show them, take nothing; replay: back to their queue; purge: drop them",
    )
    parser.add_argument("--queue", default=workqueue.DEFAULT_QUEUE, help="the work queue whose dead tasks to handle")
    parser.add_argument(
        "--limit", type=workqueue.number(int, minimum=1), metavar="N", help="list or replay only the first N"
    )
    workqueue.add_connection_arguments(parser)
    return parser


def main() -> int:
    args = make_argument_parser().parse_args()
    workqueue.setup_logging()
    workqueue.check_queue_name(args.queue)
    if args.limit and args.action == "purge":
        raise workqueue.UsageError("purge drops every dead task: --limit does not go with it")
    dead_letter_queue = workqueue.dead_letter_queue(args.queue)
    connection, url = workqueue.connect(workqueue.broker_urls(args.url), retry_for=2)
    try:
        channel = connection.channel()
        try:
            waiting = channel.queue_declare(queue=dead_letter_queue, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code == 404:
                raise workqueue.NoSuchQueue(f"no queue named '{dead_letter_queue}' on {workqueue.where(url)}") from None
            raise
        workqueue.check_dead_letter_limit(connection, args.queue)
        count = min(waiting, args.limit or waiting)
        if args.action == "list":
            list_dead(channel, dead_letter_queue, count, waiting)
        elif args.action == "replay":
            replay(channel, dead_letter_queue, count, args.queue)
        else:
            purged = channel.queue_purge(queue=dead_letter_queue).method.message_count
            print(f" [x] Purged {workqueue.plural(purged, 'dead task')} from '{dead_letter_queue}'")
    except pika.exceptions.ChannelClosedByBroker as error:
        raise workqueue.access_refused(error, url) or error from None
    finally:
        if connection.is_open:
            connection.close()
    return workqueue.EXIT_OK


def dead_tasks(channel, queue: str, count: int) -> Iterator[tuple[int, pika.BasicProperties, bytes]]:
    """The first `count` messages of a queue, each taken unacked, one at a time (basic_get: the
    broker hands out no more than we take). The caller acks each, or gives them back."""
    for _ in range(count):
        method, properties, body = channel.basic_get(queue)
        if method is None:  # the queue emptied under us (another client took them)
            return
        yield method.delivery_tag, properties, body


def list_dead(channel, queue: str, count: int, waiting: int) -> None:
    """Print the first `count` dead tasks, and take none.

    Every waiting one is taken (unacked) and all are given back at once, in order: a quorum
    queue puts a message given back behind those given back before it, so giving back only the
    first few could reorder the queue."""
    last_tag = None
    for number, (delivery_tag, properties, body) in enumerate(dead_tasks(channel, queue, waiting), 1):
        last_tag = delivery_tag
        if number > count:
            continue
        headers = properties.headers or {}
        attempts = runs_of(headers)
        origin = headers.get("x-original-queue", "?")
        died = headers.get("x-failed-at", "at an unknown time")
        error = headers.get("x-error", "no x-error header")
        task_id = f"  id {workqueue.printable(properties.message_id, limit=64)}" if properties.message_id else ""
        print(f"{number:>4}  '{workqueue.printable(body, limit=50)}'{task_id}")
        print(f"      {workqueue.printable(str(error), limit=200)}")
        print(f"      {attempts}, from '{workqueue.printable(str(origin))}', died {workqueue.printable(str(died))}")
    if last_tag is not None:
        channel.basic_nack(delivery_tag=last_tag, multiple=True, requeue=True)
    shown = f", {count:,} shown" if count < waiting else ""
    print(f" [x] {workqueue.plural(waiting, 'dead task')} in '{queue}'{shown}; none was taken")


def runs_of(headers: dict) -> str:
    """What became of the dead task's tries, from worker.py's headers: '4 failed runs'."""
    failed, unfinished = headers.get("x-retries"), headers.get("x-unfinished-runs", 0)
    if not (isinstance(failed, int) and isinstance(unfinished, int) and failed >= 0 and unfinished >= 0):
        return "runs unknown"
    if unfinished:  # dead-lettered unrun by a crash-loop guard
        came_back = f"came back {workqueue.plural(unfinished, 'time')} without an ack"
        return f"{workqueue.plural(failed, 'failed run')}, then {came_back}"
    return workqueue.plural(failed + 1, "failed run")


def replay(channel, queue: str, count: int, default_target: str) -> None:
    """Publish each dead task to the queue it came from (confirmed), then ack it: a crash in
    between leaves it in both places, never in neither."""
    channel.confirm_delivery()
    replayed = 0
    targets = set()
    for delivery_tag, properties, body in dead_tasks(channel, queue, count):
        headers = properties.headers or {}
        target = headers.get("x-original-queue")
        target = target if isinstance(target, str) and target else default_target
        properties.headers = {
            **policy.due_header(time.time()),  # due now: the worker's queue-wait counts from the replay
            **{k: v for k, v in workqueue.without_broker_headers(headers).items() if k not in FAILURE_HEADERS},
        }
        try:
            channel.basic_publish(exchange="", routing_key=target, body=body, properties=properties, mandatory=True)
        except pika.exceptions.UnroutableError:
            raise workqueue.NotConfirmed(
                f"replayed {workqueue.plural(replayed, 'dead task')}, then stopped: no queue '{target}' to put "
                f"'{workqueue.printable(body, limit=50)}' back on (start a worker for it first)"
            ) from None
        except pika.exceptions.NackError:
            raise workqueue.NotConfirmed(
                f"replayed {workqueue.plural(replayed, 'dead task')}, then the broker refused one; the rest stay"
            ) from None
        channel.basic_ack(delivery_tag)
        replayed += 1
        targets.add(target)
    where = ", ".join(f"'{t}'" for t in sorted(targets)) or f"'{default_target}'"
    print(f" [x] Replayed {workqueue.plural(replayed, 'dead task')} to {where}")


if __name__ == "__main__":
    workqueue.run(main)
