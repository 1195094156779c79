#!/usr/bin/env python
"""Send tasks to the work queue: one from the command line, or one per line of a file.

Every dot in a task is one second of work for worker.py. Messages are
persistent and the queue durable, so tasks survive a broker restart; a task
counts as sent only once the broker confirmed it (publisher confirms).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Iterator

import pika

import workqueue

LOGGER = logging.getLogger("new_task")

CONFIRM_WINDOW = 1000  # messages published but not yet confirmed, at most
RECONNECT_FOR = 60.0  # seconds to keep trying after a connection dropped mid-run
CONFIRM_TIMEOUT = 15.0  # seconds without any confirm while messages wait for one: reconnect and resend
NACK_RETRIES = 6  # a nacked message is sent again this many times before it counts as failed

EXAMPLES = """\
examples:
  python new_task.py                      # sends 'Hello World!'
  python new_task.py A heavy task.....    # five dots: five seconds of work
  python new_task.py --file tasks.txt     # one task per line
  seq 1000000 | python new_task.py --file -
  python new_task.py --queue-type classic --transient Lost on restart...
"""


def make_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Publish tasks to a durable RabbitMQ work queue, with publisher confirms.",
        epilog=EXAMPLES + "\n" + workqueue.EXIT_CODES_HELP,
        formatter_class=workqueue.HelpFormatter,
    )
    parser.add_argument(
        "words",
        nargs="*",
        help="the task: words joined by spaces (default: 'Hello World!')",
    )
    parser.add_argument(
        "--file",
        metavar="PATH",
        help="publish one task per non-empty line of PATH ('-' = stdin)",
    )
    parser.add_argument(
        "--transient",
        action="store_true",
        help="non-persistent messages: lost when a classic queue's broker restarts",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help=f"seconds to keep trying to reach the broker at start ({RECONNECT_FOR:g} after a drop)",
    )
    workqueue.add_connection_arguments(parser)
    workqueue.add_queue_arguments(parser)
    return parser


def lines_of(stream) -> Iterator[bytes]:
    """Each non-empty line of a binary stream, without its line ending, read lazily."""
    for line in stream:
        body = line.rstrip(b"\r\n")
        if body:
            yield body


class Publisher:
    """Publishes messages over an asynchronous connection with many confirms outstanding.

    A blocking channel in confirm mode waits one round trip per message; here
    up to CONFIRM_WINDOW messages are in flight and each confirm frees a slot.
    If the connection drops, every message not yet confirmed is published
    again on the next connection, so nothing is lost (a message in flight at
    the drop may arrive twice).
    """

    def __init__(
        self,
        *,
        urls,
        queue,
        queue_type,
        persistent,
        messages,
        connect_timeout,
        show_progress,
    ):
        self.urls = urls
        self.queue = queue
        self.queue_type = queue_type
        self.properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent if persistent else pika.DeliveryMode.Transient
        )
        self.messages = messages
        self.connect_timeout = connect_timeout
        self.show_progress = show_progress

        # A message is (body, times nacked). After a cluster node is lost, a channel may nack every
        # message for a quorum queue whose leader moved: a new connection, after a pause, gets through.
        # We wait for the rest of the window's confirms first, so that no ack is thrown away.
        self.to_resend: deque[tuple[bytes, int]] = deque()  # unconfirmed at a drop, or nacked
        self.unconfirmed: OrderedDict[int, tuple[bytes, int]] = OrderedDict()  # delivery tag -> message
        self.why_closed: str | None = None  # why we closed a connection before we were done
        self.refused = False  # the broker nacked messages on this connection
        self.warned_of_nacks = False
        self.last_confirm = time.monotonic()
        self.source_done = False
        self.published = self.confirmed = self.nacked = self.returned = self.resent = 0
        self.finished = False
        self.fatal: workqueue.WorkQueueError | None = None
        self.connection = self.channel = None
        self.delivery_tag = 0
        self.declared = False
        self.opened = False
        self.last_error = "no broker URL answered"
        self.started = time.monotonic()

    def run(self) -> None:
        """Connect, publish everything, and come back when all is confirmed (or raise)."""
        deadline = time.monotonic() + self.connect_timeout
        retry_for = self.connect_timeout
        delay = 0.25
        attempt = 0
        while True:
            url = self.urls[attempt % len(self.urls)]
            attempt += 1
            self.opened = False
            self.connection = pika.SelectConnection(
                workqueue.connection_parameters(url),
                on_open_callback=self.on_connection_open,
                on_open_error_callback=self.on_connection_open_error,
                on_close_callback=self.on_connection_closed,
            )
            self.connection.ioloop.start()  # runs until a callback stops it
            if self.fatal:
                raise self.fatal
            if self.finished:
                return
            if self.opened:  # it was a drop, not a failed attempt: start a new retry window
                retry_for = RECONNECT_FOR
                deadline = time.monotonic() + retry_for
                delay = delay if self.refused else 0.25  # the pause grows while the broker keeps nacking
            elif time.monotonic() + delay > deadline and attempt % len(self.urls) == 0:
                raise workqueue.BrokerUnreachable(f"{self.last_error} (gave up after {retry_for:g}s)")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    # Connection and channel: each step opens the next.

    def on_connection_open(self, connection):
        """Connected: open a channel."""
        self.opened = True
        self.refused = False
        connection.channel(on_open_callback=self.on_channel_open)

    def on_connection_open_error(self, connection, error):
        """The broker did not let us in; run() tries again unless the login was refused."""
        if workqueue.is_login_refused(error):
            self.fatal = workqueue.LoginRefused("login refused: wrong user, password or vhost")
        self.last_error = f"cannot reach {workqueue.where(self.url_of(connection))}: {workqueue.describe(error)}"
        connection.ioloop.stop()

    def on_connection_closed(self, connection, reason):
        """Closed by us when done, or lost: then run() reconnects and sends the unconfirmed again."""
        if not self.finished and not self.fatal:
            self.to_resend.extendleft(reversed(self.unconfirmed.values()))
            self.unconfirmed.clear()
            if not self.refused:  # nacks were announced when they came
                LOGGER.warning(
                    "%s; reconnecting, %d unconfirmed message(s) will be sent again",
                    self.why_closed or f"connection lost ({workqueue.describe(reason)})",
                    len(self.to_resend),
                )
        self.why_closed = None
        connection.ioloop.stop()

    def on_channel_open(self, channel):
        """Channel open: declare the durable queue, exactly as worker.py does."""
        self.channel = channel
        self.delivery_tag = 0
        channel.add_on_close_callback(self.on_channel_closed)
        channel.add_on_return_callback(self.on_returned)
        channel.queue_declare(
            queue=self.queue,
            durable=True,
            arguments=workqueue.queue_arguments(self.queue_type),
            callback=self.on_queue_declared,
        )

    def on_channel_closed(self, channel, reason):
        """A 406 on declare means the queue exists with other arguments: fatal. Otherwise reconnect."""
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and reason.reply_code == 406 and not self.declared:
            self.fatal = workqueue.queue_mismatch(self.queue, reason.reply_text)
        if self.connection.is_open:
            self.connection.close()

    def on_queue_declared(self, _frame):
        """Queue ready: turn on publisher confirms."""
        self.declared = True
        self.channel.confirm_delivery(ack_nack_callback=self.on_confirm, callback=self.on_confirm_mode)

    def on_confirm_mode(self, _frame):
        """Confirms on: start publishing, and show progress on a terminal."""
        if self.show_progress:
            self.connection.ioloop.call_later(0.5, self.print_progress)
        self.last_confirm = time.monotonic()
        self.connection.ioloop.call_later(1.0, self.watch_confirms)
        self.publish_more()

    def watch_confirms(self):
        """A broker that neither acks nor nacks (a queue stuck without a leader) gets another chance elsewhere."""
        if not self.connection.is_open:
            return
        if self.unconfirmed and time.monotonic() - self.last_confirm > CONFIRM_TIMEOUT:
            self.why_closed = f"no confirm from the broker for {CONFIRM_TIMEOUT:.0f}s"
            self.connection.close()  # on_connection_closed arranges the reconnect and the resend
            return
        self.connection.ioloop.call_later(1.0, self.watch_confirms)

    # Publishing and confirms.

    def next_message(self) -> tuple[bytes, int] | None:
        if self.to_resend:
            self.resent += 1
            return self.to_resend.popleft()
        if not self.source_done:
            body = next(self.messages, None)
            if body is not None:
                return body, 0
            self.source_done = True
        return None

    def publish_more(self):
        """Fill the confirm window; close the connection once everything is confirmed."""
        if not self.channel.is_open:  # closing: the next connection takes over
            return
        if self.refused:  # nacked: publish nothing more here; once the window settles, reconnect
            if not self.unconfirmed and self.connection.is_open:
                self.connection.close()
            return
        if not self.unconfirmed:
            self.last_confirm = time.monotonic()  # nothing was waiting: the confirm clock starts now
        while len(self.unconfirmed) < CONFIRM_WINDOW:
            message = self.next_message()
            if message is None:
                break
            self.channel.basic_publish(
                exchange="",
                routing_key=self.queue,
                body=message[0],
                properties=self.properties,
                mandatory=True,  # an unroutable message comes back instead of vanishing
            )
            self.delivery_tag += 1
            self.unconfirmed[self.delivery_tag] = message
            self.published += 1
        if self.source_done and not self.to_resend and not self.unconfirmed and not self.finished:
            self.finished = True
            self.connection.close()

    def on_confirm(self, frame):
        """The broker confirmed (ack) or refused (nack) one message, or all up to a tag."""
        method = frame.method
        self.last_confirm = time.monotonic()
        if method.multiple:
            settled = []
            while self.unconfirmed and next(iter(self.unconfirmed)) <= method.delivery_tag:
                settled.append(self.unconfirmed.popitem(last=False)[1])
        else:
            settled = [self.unconfirmed.pop(method.delivery_tag)] if method.delivery_tag in self.unconfirmed else []
        if isinstance(method, pika.spec.Basic.Ack):
            self.confirmed += len(settled)
            self.publish_more()
            return
        again = [(body, nacks + 1) for body, nacks in settled if nacks < NACK_RETRIES]
        self.nacked += len(settled) - len(again)  # refused every time: failures
        if again:
            if not self.warned_of_nacks:
                LOGGER.warning("the broker refused (nacked) messages; sending them again on a new connection")
                self.warned_of_nacks = True
            self.to_resend.extend(again)
            self.refused = True  # publish_more reconnects once the messages in flight are settled
        self.publish_more()

    def on_returned(self, _channel, _method, _properties, _body):
        """Unroutable: the queue was deleted under us. Its ack follows; count it as failed."""
        self.returned += 1

    def print_progress(self):
        if self.finished or not self.connection.is_open:
            return
        rate = self.confirmed / max(time.monotonic() - self.started, 1e-9)
        sys.stderr.write(f"\r  {self.confirmed:,} confirmed, {len(self.unconfirmed):,} in flight ({rate:,.0f}/s)  ")
        sys.stderr.flush()
        self.connection.ioloop.call_later(0.5, self.print_progress)

    def url_of(self, connection) -> str:
        params = connection.params
        scheme = "amqps" if params.ssl_options else "amqp"
        return f"{scheme}://{params.host}:{params.port}/{params.virtual_host}"


def main() -> int:
    args = make_argument_parser().parse_args()
    workqueue.setup_logging()
    urls = workqueue.broker_urls(args.url)
    for url in urls:
        workqueue.connection_parameters(url)  # a bad URL is a usage error, before anything is sent
    if args.transient and args.queue_type == "quorum":
        LOGGER.warning("--transient has no effect on a quorum queue: it keeps every message on disk")

    if args.file:
        if args.words:
            raise workqueue.UsageError("give either words or --file, not both")
        try:
            stream = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
        except OSError as error:
            raise workqueue.UsageError(f"cannot read {args.file}: {error.strerror}") from None
        messages = lines_of(stream)
    else:
        message = " ".join(args.words) or "Hello World!"
        messages = iter([message.encode()])

    publisher = Publisher(
        urls=urls,
        queue=args.queue,
        queue_type=args.queue_type,
        persistent=not args.transient,
        messages=messages,
        connect_timeout=args.connect_timeout,
        show_progress=bool(args.file) and sys.stderr.isatty(),
    )
    try:
        publisher.run()
    finally:
        if publisher.show_progress:
            sys.stderr.write("\r\033[K")
    failed = publisher.nacked + publisher.returned
    if failed:
        raise workqueue.NotConfirmed(
            f"{failed} of {publisher.published - publisher.resent} message(s) not taken by the broker "
            f"({publisher.nacked} nacked, {publisher.returned} unroutable)"
        )
    if args.file:
        print(f" [x] Sent {publisher.confirmed - publisher.returned:,} messages, all confirmed")
        if publisher.resent:
            print(f" [x] {publisher.resent:,} were sent again after a connection drop or a nack (possible duplicates)")
    else:
        print(f" [x] Sent '{message}'")
    return workqueue.EXIT_OK


if __name__ == "__main__":
    workqueue.run(main)
