#!/usr/bin/env python
"""Delete a queue, or with --purge drop its messages and keep it."""

from __future__ import annotations

import argparse

import pika

import workqueue

EXAMPLES = """\
examples:
  python delete_queue.py                  # deletes task_queue
  python delete_queue.py task_queue.dlq   # the dead-letter queue
  python delete_queue.py --if-empty       # only if no message is waiting
  python delete_queue.py --purge          # drop the messages, keep the queue
"""


def make_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Delete (or purge) a RabbitMQ queue.",
        epilog=EXAMPLES + "\n" + workqueue.EXIT_CODES_HELP,
        formatter_class=workqueue.HelpFormatter,
    )
    parser.add_argument("queue", nargs="?", default=workqueue.DEFAULT_QUEUE, help="queue to delete")
    parser.add_argument("--if-empty", action="store_true", help="delete only if no message is waiting in it")
    parser.add_argument("--if-unused", action="store_true", help="delete only if no worker consumes from it")
    parser.add_argument("--purge", action="store_true", help="drop every waiting message but keep the queue")
    workqueue.add_connection_arguments(parser)
    return parser


def main() -> int:
    args = make_argument_parser().parse_args()
    workqueue.check_queue_name(args.queue, "queue", derived=False)  # (a .dlq or a .retry queue is one to delete)
    if args.purge and (args.if_empty or args.if_unused):
        raise workqueue.UsageError("--purge keeps the queue: it does not go with --if-empty or --if-unused")
    connection, url = workqueue.connect(workqueue.broker_urls(args.url), retry_for=2)
    try:
        return delete_or_purge(args, connection.channel(), url)
    except pika.exceptions.ChannelClosedByBroker as error:
        raise workqueue.access_refused(error, url) or error from None
    finally:
        if connection.is_open:
            connection.close()


def delete_or_purge(args: argparse.Namespace, channel, url: str) -> int:

    # queue_delete of a missing queue succeeds silently; a passive declare tells us it is missing.
    try:
        declared = channel.queue_declare(queue=args.queue, passive=True).method
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code == 404:
            raise workqueue.NoSuchQueue(f"no queue named '{args.queue}' on {workqueue.where(url)}") from None
        raise

    if args.purge:
        result = channel.queue_purge(queue=args.queue)
        print(f" [x] Purged {workqueue.plural(result.method.message_count, 'message')} from '{args.queue}'")
        return workqueue.EXIT_OK

    # Quorum queues refuse the if-empty and if-unused flags (540 NOT_IMPLEMENTED),
    # so check the conditions here, from the passive declare's counts.
    if args.if_empty and declared.message_count:
        raise workqueue.QueueInUse(
            f"queue '{args.queue}' not deleted: it is not empty ({declared.message_count:,} ready)"
        )
    if args.if_unused and declared.consumer_count:
        raise workqueue.QueueInUse(
            f"queue '{args.queue}' not deleted: it is in use ({workqueue.plural(declared.consumer_count, 'consumer')})"
        )
    result = channel.queue_delete(queue=args.queue)
    print(f" [x] Deleted queue '{args.queue}' ({workqueue.plural(result.method.message_count, 'message')} dropped)")
    return workqueue.EXIT_OK


if __name__ == "__main__":
    workqueue.run(main)
