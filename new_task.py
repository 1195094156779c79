#!/usr/bin/env python
"""Send tasks to the work queue: one from the command line, or one per line of a file.

Every dot in a task is one second of work for worker.py. Messages are
persistent and the queue durable, so tasks survive a broker restart; a task
counts as sent only once the broker confirmed it (publisher confirms).

--delay S (or --at TIME) sends it to a delay queue, <queue>.delay.<S>s, whose TTL moves it to the
work queue at its time: until then it waits in the broker, held by no worker. --priority high
puts it before the waiting tasks, on RabbitMQ 4's quorum queues.
"""

from __future__ import annotations

import argparse
import logging
import math
import queue
import re
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from datetime import time as dt_time

import pika
from pika.adapters.select_connection import IOLoop

import policy
import workqueue

LOGGER = logging.getLogger("new_task")

CONFIRM_WINDOW = 1000  # messages published but not yet confirmed, at most
RECONNECT_FOR = 60.0  # seconds to keep trying after a connection dropped mid-run
CONFIRM_TIMEOUT = 15.0  # seconds without any confirm while messages wait for one: reconnect and resend
CLOSE_TIMEOUT = 5.0  # seconds a broker has to answer our close before we drop the connection
READ_CHUNK = 64 * 1024  # bytes read from the input at a time: a fast input comes in batches of lines
READ_AHEAD = 4  # batches of lines read but not yet published, at most
NACK_RETRIES = 6  # a nacked message is sent again this many times before it counts as failed
PRIORITIES = {"normal": None, "high": 9}  # RabbitMQ 4's quorum queues serve 5 and above as high, the rest as normal
RENEW_DELAY_QUEUE = 600.0  # seconds between declarations of a delay queue while publishing: its x-expires lease

EXAMPLES = """\
examples:
  python new_task.py                      # sends 'Hello World!'
  python new_task.py A heavy task.....    # five dots: five seconds of work
  python new_task.py --file tasks.txt     # one task per line
  seq 1000000 | python new_task.py --file -
  tail -f jobs.log | python new_task.py --file -   # each new line is sent as it comes
  python new_task.py --queue-type classic --transient Lost on restart...
  python new_task.py --delay 600 Send the reminder.   # no worker sees it for 10 minutes
  python new_task.py --at 18:30 Send the report.      # the next 18:30, local time
  python new_task.py --priority high Urgent.          # before the waiting normal tasks (RabbitMQ 4)
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
    later = parser.add_mutually_exclusive_group()
    later.add_argument(
        "--delay",
        type=workqueue.non_negative(float),
        default=0,
        metavar="S",
        help="no worker sees the task for S seconds (rounded up to whole seconds); it waits in the broker, "
        "in <queue>.delay.<S>s, which goes away an hour after its last use",
    )
    later.add_argument(
        "--at",
        metavar="TIME",
        help="no worker sees the task before TIME: HH:MM or HH:MM:SS (the next one, local time), "
        "or a date and time such as 2026-12-24T18:00 (local unless it names its offset)",
    )
    parser.add_argument(
        "--priority",
        choices=PRIORITIES,
        default="normal",
        help="high: workers take it ahead of the waiting normal tasks, about 2:1 (a quorum queue on RabbitMQ 4.0 "
        "or later)",
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


def seconds_until(text: str, now: datetime) -> float:
    """--at: seconds from `now` (aware, local) to TIME: HH:MM[:SS] the next time the clock shows it,
    or an ISO 8601 date and time (local unless it gives an offset), which must not be past."""
    clock = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", text.strip())
    if clock:
        hour, minute, second = (int(part or 0) for part in clock.groups())
        if hour > 23 or minute > 59 or second > 59:
            raise workqueue.UsageError(f"--at {text}: not a time of day")
        today = now.astimezone().date()
        for day in (today, today + timedelta(days=1), today + timedelta(days=2)):
            # A local time of that day, with that day's offset: right across a daylight-saving change.
            when = datetime.combine(day, dt_time(hour, minute, second)).astimezone()
            if when > now:  # the next one: today's, or, passed (or skipped by the clock change), tomorrow's
                return (when - now).total_seconds()
        raise workqueue.UsageError(f"--at {text}: not a time of day")
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise workqueue.UsageError(
            f"--at {text}: want HH:MM, HH:MM:SS or a date and time like 2026-12-24T18:00"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # a local time
    if when < now:
        raise workqueue.UsageError(f"--at {text}: that time has passed")
    return (when - now).total_seconds()


END = None  # the input's last item in a line queue: no more lines


def queued(*batches: Iterable[bytes]) -> queue.Queue:
    """A line queue holding these batches of lines, then END: the input, all of it known already."""
    lines: queue.Queue = queue.Queue()
    for batch in batches:
        lines.put(list(batch))
    lines.put(END)
    return lines


class LineReader:
    """Reads the input in a thread of its own and hands over its lines in batches, through a queue.

    Reading a pipe blocks until the next line comes (`tail -f jobs.log | ...`); done in the
    publisher's thread, that would hold the connection's ioloop, and each line back until the
    next. Here a line goes into the queue as soon as it is read, with whatever else had come
    (a raw read returns what the pipe has, up to READ_CHUNK): a fast input is read in batches of
    thousands of lines, a slow one line by line. Shared with the publisher's thread: only the
    queue.Queue (thread-safe), and `wake`, which must be safe to call from this thread.

    The stream must be unbuffered (open(..., buffering=0)): a buffered one has a lock that
    Python's exit waits for, and a reader still blocked in a read holds it (a fatal error).
    """

    def __init__(self, stream):
        self.stream = stream  # owned by the reader thread
        self.wake: Callable[[], None] = lambda: None
        self.lines: queue.Queue = queue.Queue(maxsize=READ_AHEAD)  # full: the reader waits (back-pressure)
        self.error: OSError | None = None  # set before END is queued; read by the publisher after END

    def start(self, wake: Callable[[], None]) -> None:
        """Start reading; `wake` is called (from the reader's thread) when lines come to an empty queue."""
        self.wake = wake
        # A daemon: if the broker is given up on, a reader still waiting on a pipe must not keep us alive.
        threading.Thread(target=self._read, name="line-reader", daemon=True).start()

    def _read(self) -> None:
        partial = b""  # the start of a line whose end has not been read yet
        try:
            while chunk := self.stream.read(READ_CHUNK):  # a raw file: one read(2), what is there
                *complete, partial = (partial + chunk).split(b"\n")
                self._put(complete)
            self._put([partial])  # a last line without a line end
        except OSError as error:
            self.error = error
        finally:
            self._put(END)

    def _put(self, batch: list[bytes] | None) -> None:
        if batch is not END:
            batch = [body for line in batch if (body := line.rstrip(b"\r"))]  # blank lines are no tasks
            if not batch:
                return
        self.lines.put(batch)
        # The publisher stops taking when it finds the queue empty; the one item in it now is
        # then new, and the publisher may be idle: wake it. Only this thread puts, so no second
        # item can slip in between; if the publisher took the item already, it was not idle.
        if self.lines.qsize() == 1:
            self.wake()


class Outbox:
    """The messages to publish and those waiting for a confirm: pure bookkeeping, no I/O.

    The messages come in batches from `lines`, a queue.Queue that ends with END (a LineReader's,
    or queued()). A message is (body, times nacked). take() hands out the next one while fewer
    than `window` wait for a confirm; each then waits under its delivery tag until the broker
    acks it (done) or nacks it (sent again later, up to NACK_RETRIES times, then failed). When a
    connection drops, every unconfirmed message goes back to the front of the line, to be sent again.
    """

    def __init__(self, lines: queue.Queue, window: int = CONFIRM_WINDOW):
        self.lines = lines
        self.batch: Iterator[bytes] = iter(())  # the batch being taken from
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
            body = next(self.batch, None)
            while body is None:
                if self.source_done:
                    return None
                try:
                    batch = self.lines.get_nowait()
                except queue.Empty:
                    return None  # nothing read yet: the reader wakes the publisher when lines come
                if batch is END:
                    self.source_done = True
                    return None
                self.batch = iter(batch)
                body = next(self.batch, None)
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
    """Publishes an Outbox over asynchronous connections, one at a time, many confirms outstanding.

    A blocking channel in confirm mode waits one round trip per message; here up to
    CONFIRM_WINDOW messages are in flight and each confirm frees a slot. If the connection
    drops, every message not yet confirmed is published again on the next connection, so
    nothing is lost (a message in flight at the drop may arrive twice).

    run() makes a Session for each connection in turn: the session owns that connection, its
    channel, its state and its timers, and ends by stopping the ioloop; run() then decides what
    follows: done, a fatal error, or a reconnect after a pause.

    Threads: run()'s thread owns everything here and in the Session. The one call from another
    thread is wake() (the LineReader's), which only asks the ioloop to call publish_more; one
    ioloop serves each session in turn, so a wake always reaches the current one.
    """

    def __init__(
        self, *, urls, queue, queue_type, persistent, outbox, connect_timeout, show_progress, delay=0, priority=None
    ):
        self.urls = urls
        self.queue = queue
        self.queue_type = queue_type
        self.delivery_mode = pika.DeliveryMode.Persistent if persistent else pika.DeliveryMode.Transient
        self.delay = delay  # whole seconds each task waits in the delay queue before a worker may take it
        self.priority = priority
        # Where the tasks go: the work queue, or a delay queue whose TTL moves each one there at its time.
        self.target = workqueue.delay_queue(queue, delay) if delay else queue
        self.stamped: tuple[int, pika.BasicProperties] = (-1, pika.BasicProperties())  # see properties()
        self.outbox = outbox
        self.connect_timeout = connect_timeout
        self.show_progress = show_progress
        self.ioloop = IOLoop()
        self.started = time.monotonic()
        self.warned_of_nacks = False
        self.last_error = "no broker URL answered"
        self.fatal: workqueue.WorkQueueError | None = None
        self.session: Session | None = None  # the current connection's

    def run(self) -> None:
        """Connect, publish everything, and come back when all is confirmed (or raise)."""
        retry_for = self.connect_timeout
        deadline = time.monotonic() + retry_for
        backoff = workqueue.Backoff()
        attempt = 0
        while True:
            confirmed_before = self.outbox.confirmed
            self.session = Session(self, self.urls[attempt % len(self.urls)])
            attempt += 1
            self.ioloop.start()  # runs until the session ends
            if self.fatal:
                raise self.fatal
            if self.outbox.finished:
                return
            if self.outbox.confirmed > confirmed_before:  # it got somewhere: a new retry window
                retry_for = RECONNECT_FOR
                deadline = time.monotonic() + retry_for
                if not self.session.nacked_here:  # the pause keeps growing while the broker keeps nacking
                    backoff.reset()
            pause = backoff.next()
            if time.monotonic() + pause > deadline and attempt % len(self.urls) == 0:
                tried = time.monotonic() - (deadline - retry_for)
                raise workqueue.BrokerUnreachable(f"{self.last_error} (gave up after trying for {tried:.1f}s)")
            time.sleep(pause)

    def wake(self) -> None:
        """From the reader's thread: lines came, and the publisher may be idle waiting for them."""
        self.ioloop.add_callback_threadsafe(self.publish_more)  # pika's one thread-safe call

    def publish_more(self) -> None:
        self.session.publish_more()

    def properties(self) -> pika.BasicProperties:
        """The next message's properties: persistent (or not), its priority, the time it is published
        (whole seconds: the worker's queue-wait metric starts there) and, delayed, when it is due."""
        now = time.time()
        if self.delay:
            due = policy.due_header(now + self.delay)  # the worker shows how late it started
            return pika.BasicProperties(
                delivery_mode=self.delivery_mode, priority=self.priority, timestamp=int(now), headers=due
            )
        second, properties = self.stamped
        if second != int(now):  # one object a second, shared by the messages of that second
            properties = pika.BasicProperties(
                delivery_mode=self.delivery_mode, priority=self.priority, timestamp=int(now)
            )
            self.stamped = (int(now), properties)
        return properties

    def warn(self, message: str, *args) -> None:
        """A warning on a line of its own: the progress line, if shown, is wiped first."""
        if self.show_progress:
            sys.stderr.write("\r\033[K")
        LOGGER.warning(message, *args)


class Session:
    """One connection of the Publisher, from its opening to its close: its channel, state and timers.

    Each callback below opens the next step. When the connection closes, its timers are cancelled
    and the ioloop stops, so nothing of a session outlives its connection.
    """

    def __init__(self, publisher: Publisher, url: str):
        self.publisher = publisher
        self.outbox = publisher.outbox
        self.ioloop = publisher.ioloop
        self.url = url
        self.channel = None
        self.declaring: str | None = None  # the queue being declared: a 406 now is about its arguments
        self.declared = False  # every queue is declared: a 406 from now on is not about their arguments
        self.ready = False  # its channel is in confirm mode and not closing: publish_more may publish
        self.blocked = False  # the broker blocked it (a memory or disk alarm): waiting is not a failure
        self.nacked_here = False  # the broker nacked on it: publish nothing more here, reconnect
        self.why_closing: str | None = None  # why we closed it before we were done
        self.last_confirm = time.monotonic()
        self.timers: dict[str, object] = {}  # name -> the ioloop's handle; all cancelled at the close
        self.connection = pika.SelectConnection(
            workqueue.connection_parameters(url),
            on_open_callback=self.on_connection_open,
            on_open_error_callback=self.on_connection_open_error,
            on_close_callback=self.on_connection_closed,
            custom_ioloop=self.ioloop,
        )

    def call_later(self, name: str, seconds: float, callback: Callable[[], None]) -> None:
        """A timer of this session's (one per name): it never fires after the connection closed."""
        self.timers[name] = self.ioloop.call_later(seconds, callback)

    def cancel_timers(self) -> None:
        for timer in self.timers.values():
            self.ioloop.remove_timeout(timer)  # (a timer that fired already: nothing to do)

    # Connection and channel: each step opens the next.

    def on_connection_open(self, connection):
        """Connected: open a channel, and hear when the broker blocks or unblocks publishing."""
        version = workqueue.broker_version(connection)
        if self.publisher.priority is not None and version < (4,):
            release = f"RabbitMQ {'.'.join(map(str, version))}" if version > (0,) else "this broker (version unknown)"
            self.publisher.fatal = workqueue.UsageError(
                f"--priority high: the quorum queues of {release} ignore priorities "
                "(RabbitMQ 4.0 and later take high before normal); nothing sent"
            )
            connection.close()
            return
        connection.add_on_connection_blocked_callback(self.on_blocked)
        connection.add_on_connection_unblocked_callback(self.on_unblocked)
        connection.channel(on_open_callback=self.on_channel_open)

    def on_connection_open_error(self, _connection, error):
        """The broker did not let us in; run() tries again unless the login was refused."""
        if workqueue.is_login_refused(error):
            self.publisher.fatal = workqueue.LoginRefused(
                f"login refused by {workqueue.where(self.url)}: wrong user, password or vhost"
            )
        self.publisher.last_error = f"cannot reach {workqueue.where(self.url)}: {workqueue.describe(error)}"
        self.ioloop.stop()

    def on_connection_closed(self, _connection, reason):
        """Closed by us when done, or lost: then run() reconnects and sends the unconfirmed again."""
        self.ready = False
        self.cancel_timers()
        if not self.outbox.finished and not self.publisher.fatal:
            again = self.outbox.connection_lost()
            why = self.why_closing or f"connection lost ({workqueue.describe(reason)})"
            self.publisher.last_error = f"{why} on {workqueue.where(self.url)}"
            if not self.nacked_here:  # nacks were announced when they came
                self.publisher.warn("%s; reconnecting, %d unconfirmed message(s) will be sent again", why, again)
        self.ioloop.stop()

    def close(self, why: str | None = None) -> None:
        """Close the connection, and drop it if the broker does not answer in CLOSE_TIMEOUT seconds.

        A broker that stopped reading from us (a blocked connection, a queue deleted under a bulk
        publish) never answers a close; waiting for it would hang the producer for good.
        """
        self.ready = False
        if not self.connection.is_open:  # closing already, or closed
            return
        self.why_closing = self.why_closing or why
        self.cancel_timers()  # no progress and no confirm watch while it closes
        self.connection.close()
        self.call_later("close", CLOSE_TIMEOUT, self.drop_if_still_closing)

    def drop_if_still_closing(self):
        if self.connection.is_closing:
            self.publisher.warn("no answer to our close for %gs; dropping the connection", CLOSE_TIMEOUT)
            abandon(self.connection, "no answer to our close")

    def on_blocked(self, _connection, frame):
        """A memory or disk alarm: the broker takes nothing until it lifts. Wait, no drop, no resend."""
        self.blocked = True
        reason = workqueue.printable(getattr(frame.method, "reason", "") or "a resource alarm", limit=200)
        self.publisher.warn("the broker blocked publishing (%s); waiting until it unblocks", reason)

    def on_unblocked(self, _connection, _frame):
        self.blocked = False
        self.last_confirm = time.monotonic()  # the confirm clock starts again
        self.publisher.warn("the broker unblocked publishing; going on")

    def on_channel_open(self, channel):
        """Channel open: declare the durable queue, exactly as worker.py does."""
        self.channel = channel
        self.declaring = self.publisher.queue
        channel.add_on_close_callback(self.on_channel_closed)
        channel.add_on_return_callback(self.on_returned)
        channel.queue_declare(
            queue=self.publisher.queue,
            durable=True,
            arguments=workqueue.queue_arguments(self.publisher.queue_type),
            callback=self.on_queue_declared,
        )

    def on_channel_closed(self, _channel, reason):
        """A 406 (other arguments on declare; a message refused after it) or a 403 (permissions) is
        fatal; anything else: reconnect."""
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            publisher = self.publisher
            declaring = not self.declared or "inequivalent arg" in reason.reply_text  # (or renewing the delay queue)
            if reason.reply_code == 406 and declaring:  # on declaring the work queue, or its delay queue
                waiting = self.declaring != publisher.queue  # the delay queue
                publisher.fatal = workqueue.queue_mismatch(self.declaring, reason.reply_text, waiting)
            elif reason.reply_code == 406:  # a message the broker will never take (larger than max_message_size)
                publisher.fatal = workqueue.NotConfirmed(
                    f"the broker refused a message and closed the channel ({workqueue.describe(reason)}); "
                    f"{workqueue.plural(self.outbox.confirmed, 'message')} confirmed before it, the rest not confirmed "
                    "(a line longer than the broker's max_message_size?)"
                )
            publisher.fatal = publisher.fatal or workqueue.access_refused(reason, self.url)
            self.why_closing = self.why_closing or f"the broker closed the channel ({workqueue.describe(reason)})"
        self.close()

    def on_queue_declared(self, _frame):
        """Queue ready: declare the delay queue (with --delay or --at), then turn on publisher confirms."""
        if self.publisher.delay and self.declaring != self.publisher.target:
            self.declaring = self.publisher.target
            self.declare_delay_queue(callback=self.on_queue_declared)
            return
        self.declared = True
        self.channel.confirm_delivery(ack_nack_callback=self.on_confirm, callback=self.on_confirm_mode)

    def declare_delay_queue(self, callback=None):
        """Declare the delay queue: again every RENEW_DELAY_QUEUE seconds while we publish, which renews
        its x-expires lease (a publish does not), so that it never expires under a long publish."""
        publisher = self.publisher
        self.channel.queue_declare(
            queue=publisher.target,
            durable=True,
            arguments=workqueue.delay_queue_arguments(publisher.queue, publisher.delay),
            callback=callback,
        )
        self.call_later("renew", RENEW_DELAY_QUEUE, self.declare_delay_queue)

    def on_confirm_mode(self, _frame):
        """Confirms on: start publishing, and show progress on a terminal."""
        self.ready = True
        if self.publisher.show_progress:
            self.call_later("progress", 0.5, self.print_progress)
        self.last_confirm = time.monotonic()
        self.call_later("watch", 1.0, self.watch_confirms)
        self.publish_more()

    def watch_confirms(self):
        """A broker that neither acks nor nacks (a queue stuck without a leader) gets another chance elsewhere."""
        if self.blocked or not self.outbox.unconfirmed:
            self.last_confirm = time.monotonic()  # blocked by an alarm, or nothing to confirm: not a silence
        elif time.monotonic() - self.last_confirm > CONFIRM_TIMEOUT:
            self.close(f"no confirm from the broker for {CONFIRM_TIMEOUT:.0f}s")
            return  # on_connection_closed arranges the reconnect and the resend
        self.call_later("watch", 1.0, self.watch_confirms)

    # Publishing and confirms.

    def publish_more(self):
        """Fill the confirm window from what is read so far; close the connection once all is confirmed."""
        if not self.ready:  # not yet in confirm mode, or closing: the next session takes over
            return
        if self.nacked_here:  # publish nothing more here; once the window settles, reconnect
            if not self.outbox.unconfirmed:
                self.close()
            return
        while (body := self.outbox.take()) is not None:
            self.channel.basic_publish(
                exchange="",
                routing_key=self.publisher.target,
                body=body,
                properties=self.publisher.properties(),
                mandatory=True,  # an unroutable message comes back instead of vanishing
            )
        if self.outbox.finished:
            self.close()

    def on_confirm(self, frame):
        """The broker confirmed (ack) or refused (nack) one message, or all up to a tag."""
        method = frame.method
        self.last_confirm = time.monotonic()
        ack = isinstance(method, pika.spec.Basic.Ack)
        if self.outbox.settle(method.delivery_tag, method.multiple, ack):
            # After a cluster node is lost, a channel may nack every message for a quorum queue whose
            # leader moved: a new connection, after a pause, gets through. The rest of the window's
            # confirms come first, so that no ack is thrown away.
            if not self.publisher.warned_of_nacks:
                self.publisher.warn("the broker refused (nacked) messages; sending them again on a new connection")
                self.publisher.warned_of_nacks = True
            self.nacked_here = True
        self.publish_more()

    def on_returned(self, _channel, _method, _properties, _body):
        """Unroutable: the queue was deleted under us. Its ack follows; count it as failed."""
        self.outbox.returned += 1

    def print_progress(self):
        if self.outbox.finished:
            return
        rate = self.outbox.confirmed / max(time.monotonic() - self.publisher.started, 1e-9)
        blocked = ", blocked by the broker" if self.blocked else ""
        sys.stderr.write(
            f"\r  {self.outbox.confirmed:,} confirmed, {len(self.outbox.unconfirmed):,} in flight "
            f"({rate:,.0f}/s){blocked}\033[K"  # clear what a longer line before left
        )
        sys.stderr.flush()
        self.call_later("progress", 0.5, self.print_progress)


def abandon(connection: pika.SelectConnection, why: str) -> None:
    """Drop a connection whose close the broker never answers. pika 1.4 has no public call for this; its
    own heartbeat checker ends a silent connection the same way. tests/test_units.py fails if it goes."""
    connection._terminate_stream(pika.exceptions.AMQPConnectionError(why))


def main() -> int:
    args = make_argument_parser().parse_args()
    workqueue.setup_logging()
    urls = workqueue.broker_urls(args.url)
    for url in urls:
        workqueue.connection_parameters(url)  # a bad URL is a usage error, before anything is sent
    if args.transient and args.queue_type == "quorum":
        LOGGER.warning("--transient has no effect on a quorum queue: it keeps every message on disk")
    delay = math.ceil(seconds_until(args.at, datetime.now().astimezone()) if args.at else args.delay)
    if delay > workqueue.MAX_DELAY:
        raise workqueue.UsageError(
            f"--{'at' if args.at else 'delay'}: {delay}s is more than {workqueue.MAX_DELAY // 86400} days, "
            "the longest a delay queue can hold a task"
        )
    if args.priority == "high" and args.queue_type == "classic":
        raise workqueue.UsageError(
            "--priority high: a classic queue takes priorities only when declared with x-max-priority, which "
            f"'{args.queue}' is not; use a quorum queue (RabbitMQ 4.0 or later); nothing sent"
        )

    reader = None
    if args.file:
        if args.words:
            raise workqueue.UsageError("give either words or --file, not both")
        try:
            if args.file == "-":
                stream = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)  # noqa: SIM115
            else:
                stream = open(args.file, "rb", buffering=0)  # noqa: SIM115
        except OSError as error:
            raise workqueue.UsageError(f"cannot read {args.file}: {error.strerror}") from None
        reader = LineReader(stream)
        outbox = Outbox(reader.lines)
    else:
        message = " ".join(args.words) or "Hello World!"
        outbox = Outbox(queued([message.encode()]))

    publisher = Publisher(
        urls=urls,
        queue=args.queue,
        queue_type=args.queue_type,
        persistent=not args.transient,
        outbox=outbox,
        connect_timeout=args.connect_timeout,
        show_progress=bool(args.file) and sys.stderr.isatty(),
        delay=delay,
        priority=PRIORITIES[args.priority],
    )
    if reader:
        reader.start(wake=publisher.wake)
    try:
        publisher.run()
    finally:
        if publisher.show_progress:
            sys.stderr.write("\r\033[K")
    if reader and reader.error:
        raise workqueue.UsageError(
            f"cannot read {args.file}: {reader.error.strerror} "
            f"(the {workqueue.plural(outbox.confirmed, 'line')} before it were sent)"
        )
    failed = outbox.nacked + outbox.returned
    if failed:
        raise workqueue.NotConfirmed(
            f"{failed} of {outbox.published - outbox.resent} message(s) not taken by the broker "
            f"({outbox.nacked} nacked, {outbox.returned} unroutable)"
        )
    due = ""
    if delay:
        at = workqueue.clock(time.time() + delay)
        due = f", due in {delay}s (about {at}; waiting in {publisher.target})"
    if args.file:
        print(f" [x] Sent {workqueue.plural(outbox.confirmed - outbox.returned, 'message')}, all confirmed{due}")
        if outbox.resent:
            print(f" [x] {outbox.resent:,} were sent again after a connection drop or a nack (possible duplicates)")
    else:
        print(f" [x] Sent '{workqueue.printable(message)}'{due}")  # as the worker shows it: escape sequences inert
    return workqueue.EXIT_OK


if __name__ == "__main__":
    workqueue.run(main)
