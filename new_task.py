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
        type=workqueue.non_negative(float),
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


class Outbox:
    """The messages to publish and those waiting for a confirm: pure bookkeeping, no I/O.

    A message is (body, times nacked). take() hands out the next one while fewer than `window`
    wait for a confirm; each then waits under its delivery tag until the broker acks it (done)
    or nacks it (sent again later, up to NACK_RETRIES times, then failed). When a connection
    drops, every unconfirmed message goes back to the front of the line, to be sent again.
    """

    def __init__(self, messages: Iterator[bytes], window: int = CONFIRM_WINDOW):
        self.messages = messages
        self.window = window
        self.to_resend: deque[tuple[bytes, int]] = deque()  # unconfirmed at a drop, or nacked
        self.unconfirmed: OrderedDict[int, tuple[bytes, int]] = OrderedDict()  # delivery tag -> message
        self.last_tag = 0  # delivery tags count from 1 on each channel
        self.source_done = False
        self.published = self.confirmed = self.nacked = self.returned = self.resent = 0

    @property
    def finished(self) -> bool:
        return self.source_done and not self.to_resend and not self.unconfirmed

    def take(self) -> bytes | None:
        """The next body to publish, if the window has room; it then waits for its confirm."""
        if len(self.unconfirmed) >= self.window:
            return None
        if self.to_resend:
            message = self.to_resend.popleft()
            self.resent += 1
        else:
            body = None if self.source_done else next(self.messages, None)
            if body is None:
                self.source_done = True
                return None
            message = (body, 0)
        self.last_tag += 1
        self.unconfirmed[self.last_tag] = message
        self.published += 1
        return message[0]

    def settle(self, delivery_tag: int, multiple: bool, ack: bool) -> int:
        """The broker acked or nacked one message, or all up to a tag; returns how many go again."""
        if multiple:
            settled = []
            while self.unconfirmed and next(iter(self.unconfirmed)) <= delivery_tag:
                settled.append(self.unconfirmed.popitem(last=False)[1])
        else:
            settled = [self.unconfirmed.pop(delivery_tag)] if delivery_tag in self.unconfirmed else []
        if ack:
            self.confirmed += len(settled)
            return 0
        again = [(body, nacks + 1) for body, nacks in settled if nacks < NACK_RETRIES]
        self.nacked += len(settled) - len(again)  # refused every time: failed
        self.to_resend.extend(again)
        return len(again)

    def connection_lost(self) -> int:
        """Every unconfirmed message goes to the front of the line; returns how many."""
        self.to_resend.extendleft(reversed(self.unconfirmed.values()))
        self.unconfirmed.clear()
        self.last_tag = 0
        return len(self.to_resend)


class Publisher:
    """Publishes an Outbox over an asynchronous connection, many confirms outstanding, and reconnects.

    A blocking channel in confirm mode waits one round trip per message; here up to
    CONFIRM_WINDOW messages are in flight and each confirm frees a slot. If the connection
    drops, every message not yet confirmed is published again on the next connection, so
    nothing is lost (a message in flight at the drop may arrive twice). Each callback below
    opens the next step; one that ends the connection stops the ioloop, and run() decides
    what follows: done, a fatal error, or a reconnect after a pause.
    """

    def __init__(self, *, urls, queue, queue_type, persistent, outbox, connect_timeout, show_progress):
        self.urls = urls
        self.queue = queue
        self.queue_type = queue_type
        self.properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent if persistent else pika.DeliveryMode.Transient
        )
        self.outbox = outbox
        self.connect_timeout = connect_timeout
        self.show_progress = show_progress
        self.started = time.monotonic()
        self.warned_of_nacks = False
        self.last_error = "no broker URL answered"
        self.fatal: workqueue.WorkQueueError | None = None
        # Of the current connection (run() resets them):
        self.url = urls[0]
        self.connection = self.channel = None
        self.opened = False  # it got as far as open
        self.declared = False  # the queue is declared: a 406 from now on is not about its arguments
        self.nacked_here = False  # the broker nacked on it: publish nothing more there, reconnect
        self.why_closing: str | None = None  # why we closed it before we were done
        self.last_confirm = time.monotonic()

    def run(self) -> None:
        """Connect, publish everything, and come back when all is confirmed (or raise)."""
        retry_for = self.connect_timeout
        deadline = time.monotonic() + retry_for
        backoff = workqueue.Backoff()
        attempt = 0
        while True:
            self.url = self.urls[attempt % len(self.urls)]
            attempt += 1
            self.opened = self.declared = self.nacked_here = False
            confirmed_before = self.outbox.confirmed
            self.connection = pika.SelectConnection(
                workqueue.connection_parameters(self.url),
                on_open_callback=self.on_connection_open,
                on_open_error_callback=self.on_connection_open_error,
                on_close_callback=self.on_connection_closed,
            )
            self.connection.ioloop.start()  # runs until a callback stops it
            if self.fatal:
                raise self.fatal
            if self.outbox.finished:
                return
            if self.outbox.confirmed > confirmed_before:  # it got somewhere: a new retry window
                retry_for = RECONNECT_FOR
                deadline = time.monotonic() + retry_for
                if not self.nacked_here:  # the pause keeps growing while the broker keeps nacking
                    backoff.reset()
            pause = backoff.next()
            if time.monotonic() + pause > deadline and attempt % len(self.urls) == 0:
                tried = time.monotonic() - (deadline - retry_for)
                raise workqueue.BrokerUnreachable(f"{self.last_error} (gave up after trying for {tried:.1f}s)")
            time.sleep(pause)

    # Connection and channel: each step opens the next.

    def on_connection_open(self, connection):
        """Connected: open a channel."""
        self.opened = True
        connection.channel(on_open_callback=self.on_channel_open)

    def on_connection_open_error(self, connection, error):
        """The broker did not let us in; run() tries again unless the login was refused."""
        if workqueue.is_login_refused(error):
            self.fatal = workqueue.LoginRefused(
                f"login refused by {workqueue.where(self.url)}: wrong user, password or vhost"
            )
        self.last_error = f"cannot reach {workqueue.where(self.url)}: {workqueue.describe(error)}"
        connection.ioloop.stop()

    def on_connection_closed(self, connection, reason):
        """Closed by us when done, or lost: then run() reconnects and sends the unconfirmed again."""
        if not self.outbox.finished and not self.fatal:
            again = self.outbox.connection_lost()
            why = self.why_closing or f"connection lost ({workqueue.describe(reason)})"
            self.last_error = f"{why} on {workqueue.where(self.url)}"
            if not self.nacked_here:  # nacks were announced when they came
                LOGGER.warning("%s; reconnecting, %d unconfirmed message(s) will be sent again", why, again)
        self.why_closing = None
        connection.ioloop.stop()

    def on_channel_open(self, channel):
        """Channel open: declare the durable queue, exactly as worker.py does."""
        self.channel = channel
        channel.add_on_close_callback(self.on_channel_closed)
        channel.add_on_return_callback(self.on_returned)
        channel.queue_declare(
            queue=self.queue,
            durable=True,
            arguments=workqueue.queue_arguments(self.queue_type),
            callback=self.on_queue_declared,
        )

    def on_channel_closed(self, channel, reason):
        """A 406 on declare (other arguments) or a 403 (permissions) is fatal; anything else: reconnect."""
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            if reason.reply_code == 406 and not self.declared:
                self.fatal = workqueue.queue_mismatch(self.queue, reason.reply_text)
            self.fatal = self.fatal or workqueue.access_refused(reason, self.url)
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
        if self.outbox.unconfirmed and time.monotonic() - self.last_confirm > CONFIRM_TIMEOUT:
            self.why_closing = f"no confirm from the broker for {CONFIRM_TIMEOUT:.0f}s"
            self.connection.close()  # on_connection_closed arranges the reconnect and the resend
            return
        self.connection.ioloop.call_later(1.0, self.watch_confirms)

    # Publishing and confirms.

    def publish_more(self):
        """Fill the confirm window; close the connection once everything is confirmed."""
        if not self.channel.is_open:  # closing: the next connection takes over
            return
        if self.nacked_here:  # publish nothing more here; once the window settles, reconnect
            if not self.outbox.unconfirmed and self.connection.is_open:
                self.connection.close()
            return
        if not self.outbox.unconfirmed:
            self.last_confirm = time.monotonic()  # nothing was waiting: the confirm clock starts now
        while (body := self.outbox.take()) is not None:
            self.channel.basic_publish(
                exchange="",
                routing_key=self.queue,
                body=body,
                properties=self.properties,
                mandatory=True,  # an unroutable message comes back instead of vanishing
            )
        if self.outbox.finished and self.connection.is_open:
            self.connection.close()

    def on_confirm(self, frame):
        """The broker confirmed (ack) or refused (nack) one message, or all up to a tag."""
        method = frame.method
        self.last_confirm = time.monotonic()
        ack = isinstance(method, pika.spec.Basic.Ack)
        if self.outbox.settle(method.delivery_tag, method.multiple, ack):
            # After a cluster node is lost, a channel may nack every message for a quorum queue whose
            # leader moved: a new connection, after a pause, gets through. The rest of the window's
            # confirms come first, so that no ack is thrown away.
            if not self.warned_of_nacks:
                LOGGER.warning("the broker refused (nacked) messages; sending them again on a new connection")
                self.warned_of_nacks = True
            self.nacked_here = True
        self.publish_more()

    def on_returned(self, _channel, _method, _properties, _body):
        """Unroutable: the queue was deleted under us. Its ack follows; count it as failed."""
        self.outbox.returned += 1

    def print_progress(self):
        if self.outbox.finished or not self.connection.is_open:
            return
        rate = self.outbox.confirmed / max(time.monotonic() - self.started, 1e-9)
        sys.stderr.write(
            f"\r  {self.outbox.confirmed:,} confirmed, {len(self.outbox.unconfirmed):,} in flight ({rate:,.0f}/s)  "
        )
        sys.stderr.flush()
        self.connection.ioloop.call_later(0.5, self.print_progress)


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

    outbox = Outbox(messages)
    publisher = Publisher(
        urls=urls,
        queue=args.queue,
        queue_type=args.queue_type,
        persistent=not args.transient,
        outbox=outbox,
        connect_timeout=args.connect_timeout,
        show_progress=bool(args.file) and sys.stderr.isatty(),
    )
    try:
        publisher.run()
    finally:
        if publisher.show_progress:
            sys.stderr.write("\r\033[K")
    failed = outbox.nacked + outbox.returned
    if failed:
        raise workqueue.NotConfirmed(
            f"{failed} of {outbox.published - outbox.resent} message(s) not taken by the broker "
            f"({outbox.nacked} nacked, {outbox.returned} unroutable)"
        )
    if args.file:
        print(f" [x] Sent {workqueue.plural(outbox.confirmed - outbox.returned, 'message')}, all confirmed")
        if outbox.resent:
            print(f" [x] {outbox.resent:,} were sent again after a connection drop or a nack (possible duplicates)")
    else:
        print(f" [x] Sent '{message}'")
    return workqueue.EXIT_OK


if __name__ == "__main__":
    workqueue.run(main)
