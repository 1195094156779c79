"""Sending tasks: the publisher under new_task.py, and Producer and AsyncProducer for applications.

    from workqueue import Producer

    with Producer() as producer:                      # AMQP_URL, else amqp://localhost
        task_id = producer.send("resize photo.jpg..")  # returns once the broker has confirmed it

One Producer serves every thread of a program; AsyncProducer is the same for asyncio. Underneath
both, and under new_task.py, is one Publisher: a SelectConnection with publisher confirms, up to
CONFIRM_WINDOW messages in flight, and every unconfirmed message sent again after a reconnect.
Every message carries an id (message_id, a UUID): send() returns it, and the worker's lines, retries
and dead letters keep it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import queue
import queue as queue_module  # (Producer's argument `queue` is the queue's name)
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from datetime import timedelta

import pika
from pika.adapters.select_connection import IOLoop

import workqueue
from workqueue import policy

LOGGER = logging.getLogger("workqueue.producer")

CONFIRM_WINDOW = 1000  # messages published but not yet confirmed, at most
RECONNECT_FOR = 60.0  # seconds new_task.py keeps trying after a connection dropped mid-run
CONFIRM_TIMEOUT = 15.0  # seconds without any confirm while messages wait for one: reconnect and resend
CLOSE_TIMEOUT = 5.0  # seconds a broker has to answer our close before we drop the connection
NACK_RETRIES = 6  # a nacked message is sent again this many times before it counts as failed
PRIORITIES = {"normal": None, "high": 9}  # RabbitMQ 4's quorum queues serve 5 and above as high, the rest as normal
RENEW_DELAY_QUEUE = 600.0  # a delay queue declared longer ago than this is declared again before a publish to it
SEND_TIMEOUT = 30.0  # Producer.send()'s default: seconds to wait for the broker's confirm

END = None  # the last item of a message source: no more messages


class Message:
    """One task on its way: where it goes, with what, and who waits for its confirm."""

    __slots__ = ("body", "delay", "future", "nacks", "properties", "returned")

    def __init__(self, body: bytes, properties: pika.BasicProperties, delay: int = 0, future=None):
        self.body = body
        self.properties = properties  # persistent, its id (message_id), priority, timestamp, due time
        self.delay = delay  # whole seconds in a delay queue before a worker may take it; 0: straight to the queue
        self.future: concurrent.futures.Future | None = future  # a Producer's sender waits on it; None: new_task.py
        self.nacks = 0  # times the broker refused it
        self.returned = False  # came back unroutable (its queue was deleted under us)

    @property
    def task_id(self) -> str:
        return self.properties.message_id


def message(
    body: bytes | str, *, delay: int = 0, priority: int | None = None, persistent: bool = True, future=None
) -> Message:
    """A task with a new id: persistent (or not), its priority, the time it is sent (whole seconds: the
    worker's queue-wait metric starts there) and, delayed, when it is due (the worker shows how late it started)."""
    now = time.time()
    properties = pika.BasicProperties(
        delivery_mode=pika.DeliveryMode.Persistent if persistent else pika.DeliveryMode.Transient,
        message_id=str(uuid.uuid4()),
        priority=priority,
        timestamp=int(now),
        headers=policy.due_header(now + delay) if delay else None,
    )
    return Message(body.encode() if isinstance(body, str) else body, properties, delay, future)


def queued(*batches: Iterable) -> queue.Queue:
    """A message source holding these batches (of Messages, or of bodies), then END: all of it known already."""
    source: queue.Queue = queue.Queue()
    for batch in batches:
        source.put(list(batch))
    source.put(END)
    return source


class Outbox:
    """The messages to publish and those waiting for a confirm: pure bookkeeping, no I/O.

    Messages come in batches from `source` (a queue that ends with END): Messages, or bodies that
    `make` turns into Messages. peek() shows the next one while fewer than `window` wait for a
    confirm; take() then marks it published, and it waits under its delivery tag until the broker
    acks it (done) or nacks it (sent again later, up to NACK_RETRIES times, then failed). When a
    connection drops, every unconfirmed message goes back to the front of the line, to be sent again.
    A message whose sender gave up before it was published (its future cancelled) is never published.
    """

    def __init__(self, source, window: int = CONFIRM_WINDOW, make: Callable[[bytes], Message] = message):
        self.source = source
        self.make = make
        self.batch: list = []  # the batch being taken from, reversed (pop() takes the next)
        self.window = window
        self.next: Message | None = None  # what peek() showed
        self.next_again = False  # whether it is sent again (after a drop or a nack)
        self.to_resend: deque[Message] = deque()  # unconfirmed at a drop, or nacked
        self.unconfirmed: OrderedDict[int, Message] = OrderedDict()  # delivery tag -> message
        self.last_tag = 0  # delivery tags count from 1 on each channel
        self.source_done = False
        self.published = self.confirmed = self.nacked = self.returned = self.resent = self.withdrawn = 0

    @property
    def finished(self) -> bool:
        return self.source_done and self.next is None and not self.to_resend and not self.unconfirmed

    def peek(self) -> Message | None:
        """The next message to publish, if the window has room and there is one; take() publishes it."""
        if self.next is None and len(self.unconfirmed) < self.window:
            self.next_again = bool(self.to_resend)
            self.next = self.to_resend.popleft() if self.to_resend else self._from_source()
        return self.next

    def _from_source(self) -> Message | None:
        while True:
            while self.batch:
                item = self.batch.pop()
                item = item if isinstance(item, Message) else self.make(item)
                if item.future is None or item.future.set_running_or_notify_cancel():
                    return item
                self.withdrawn += 1  # its sender timed out before it was published: it never is
            if self.source_done:
                return None
            try:
                batch = self.source.get_nowait()
            except queue.Empty:
                return None  # nothing yet: whoever puts more wakes the publisher
            if batch is END:
                self.source_done = True
                return None
            self.batch = list(reversed(batch))

    def take(self) -> Message:
        """The message peek() showed is published now: it waits for its confirm under the next tag."""
        message, self.next = self.next, None
        message.returned = False  # (returned on an earlier connection, its ack lost: this time may differ)
        self.resent += self.next_again
        self.last_tag += 1
        self.unconfirmed[self.last_tag] = message
        self.published += 1
        return message

    def drop(self, error: workqueue.WorkQueueError) -> Message:
        """The message peek() showed cannot be sent at all: it fails with `error`, unpublished."""
        message, self.next = self.next, None
        fail(message, error)
        return message

    def settle(self, delivery_tag: int, multiple: bool, ack: bool) -> int:
        """The broker acked or nacked one message, or all up to a tag; returns how many go again."""
        if multiple:
            settled = []
            while self.unconfirmed and next(iter(self.unconfirmed)) <= delivery_tag:
                settled.append(self.unconfirmed.popitem(last=False)[1])
        else:
            settled = [self.unconfirmed.pop(delivery_tag)] if delivery_tag in self.unconfirmed else []
        again = 0
        for message in settled:
            if ack and message.returned:  # the broker acks an unroutable message after returning it
                self.returned += 1
                fail(message, workqueue.NotConfirmed("unroutable: no queue took it (was the queue deleted?)"))
            elif ack:
                self.confirmed += 1
                if message.future is not None:
                    message.future.set_result(message.task_id)
            elif message.nacks < NACK_RETRIES:
                message.nacks += 1
                self.to_resend.append(message)
                again += 1
            else:  # refused every time: failed
                self.nacked += 1
                fail(message, workqueue.NotConfirmed(f"the broker refused it (nacked) {NACK_RETRIES + 1} times"))
        return again

    def mark_returned(self, task_id: str | None) -> None:
        """The broker returned a message as unroutable; its ack follows, and then it counts as failed."""
        for message in self.unconfirmed.values():
            if message.task_id == task_id:
                message.returned = True
                return

    def connection_lost(self) -> int:
        """Every unconfirmed message goes to the front of the line; returns how many."""
        self.to_resend.extendleft(reversed(self.unconfirmed.values()))
        self.unconfirmed.clear()
        self.last_tag = 0
        return len(self.to_resend)

    def fail_waiting(self, error: workqueue.WorkQueueError) -> int:
        """A Producer's connection failed for good (login refused, a queue mismatch): every message not
        yet confirmed fails with `error` instead of waiting for the sender's timeout; returns how many."""
        waiting = [*self.unconfirmed.values(), *self.to_resend, *([self.next] if self.next else [])]
        self.unconfirmed.clear()
        self.to_resend.clear()
        self.next = None
        self.last_tag = 0
        while (message := self.peek()) is not None:
            waiting.append(message)
            self.next = None
        for message in waiting:
            fail(message, error)
        return len(waiting)


def fail(message: Message, error: workqueue.WorkQueueError) -> None:
    if message.future is not None and not message.future.done():
        message.future.set_exception(error)


class Publisher:
    """Publishes an Outbox over asynchronous connections, one at a time, many confirms outstanding.

    A blocking channel in confirm mode waits one round trip per message; here up to
    CONFIRM_WINDOW messages are in flight and each confirm frees a slot. If the connection
    drops, every message not yet confirmed is published again on the next connection, so
    nothing is lost (a message in flight at the drop may arrive twice).

    run() makes a Session for each connection in turn: the session owns that connection, its
    channel, its state and its timers, and ends by stopping the ioloop; run() then decides what
    follows: done, a fatal error, or a reconnect after a pause. new_task.py gives up after
    `connect_timeout` seconds without a connection (RECONNECT_FOR after a drop); a Producer's
    publisher (`forever`) never does: each sender has its own timeout.

    Threads: run()'s thread owns everything here and in the Session. The calls from another thread
    are wake() and stop(), which only ask the ioloop to call publish_more (or drop the connection);
    one ioloop serves each session in turn, so a wake always reaches the current one.
    """

    def __init__(self, *, urls, queue, queue_type, outbox, connect_timeout, show_progress=False, forever=False):
        self.urls = urls
        self.queue = queue
        self.queue_type = queue_type
        self.outbox = outbox
        self.connect_timeout = connect_timeout
        self.show_progress = show_progress
        self.forever = forever
        self.ioloop = IOLoop()
        self.started = time.monotonic()
        self.warned_of_nacks = False
        self.last_error = "no broker URL answered"  # read by a Producer's senders too (one str assignment)
        self.connected = False  # whether a session is ready to publish; read by a Producer's senders too
        self.fatal: workqueue.WorkQueueError | None = None
        # The last fatal error of a Producer's publisher, until a connection opens (read by senders: one assignment).
        self.last_fatal: workqueue.WorkQueueError | None = None
        self.session: Session | None = None  # the current connection's
        self.stopping = threading.Event()  # a Producer closing for good: end the session, start no other

    def run(self) -> None:
        """Connect, publish everything, and come back when all is confirmed (or raise)."""
        retry_for = self.connect_timeout
        deadline = time.monotonic() + retry_for
        backoff = workqueue.Backoff()
        attempt = 0
        announced = False
        while not self.stopping.is_set():
            confirmed_before = self.outbox.confirmed
            self.session = Session(self, self.urls[attempt % len(self.urls)])
            attempt += 1
            self.ioloop.start()  # runs until the session ends
            self.connected = False
            if self.fatal and not self.forever:
                raise self.fatal
            if self.fatal:  # a Producer goes on; what waits fails now, not at its sender's timeout
                self.last_fatal = self.fatal
                failed = self.outbox.fail_waiting(self.fatal)
                if failed:
                    LOGGER.warning("%s (%s failed)", self.fatal, workqueue.plural(failed, "message"))
                self.fatal = None
            if self.outbox.finished:
                return
            if self.outbox.confirmed > confirmed_before:  # it got somewhere: a new retry window
                retry_for = RECONNECT_FOR
                deadline = time.monotonic() + retry_for
                if not self.session.nacked_here:  # the pause keeps growing while the broker keeps nacking
                    backoff.reset()
            pause, now = backoff.next(), time.monotonic()
            if not self.forever and attempt % len(self.urls) == 0:  # every URL tried: give up at the deadline
                if now >= deadline:
                    tried = now - (deadline - retry_for)
                    raise workqueue.BrokerUnreachable(f"{self.last_error} (gave up after trying for {tried:.1f}s)")
                pause = min(pause, deadline - now)
                if not announced and retry_for > 5 and self.outbox.confirmed == confirmed_before == 0:
                    self.warn("%s; retrying for up to %gs", self.last_error, retry_for)  # not silent while it waits
                    announced = True
            self.stopping.wait(pause)

    def wake(self) -> None:
        """From another thread: messages came, and the publisher may be idle waiting for them."""
        self.ioloop.add_callback_threadsafe(self.publish_more)  # pika's one thread-safe call

    def publish_more(self) -> None:
        if self.session is not None:
            self.session.publish_more()

    def stop(self) -> None:
        """From another thread: a Producer closing without waiting any longer; the connection is dropped."""
        self.stopping.set()
        self.ioloop.add_callback_threadsafe(lambda: self.session and self.session.drop("closing"))

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
        self.version: tuple[int, ...] = (0,)  # the broker's release
        self.declaring: str | None = None  # the queue being declared: a 406 now is about its arguments
        self.declared = False  # the work queue is declared: a 406 from now on is not about its arguments
        self.delay_queues: dict[str, float] = {}  # delay queue -> when we last declared it (its x-expires lease)
        self.awaiting_declare = False  # a delay queue's declare is on its way: publish once it is answered
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
        self.version = workqueue.broker_version(connection)
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
        self.ready = self.publisher.connected = False
        self.cancel_timers()
        if not self.outbox.finished and not self.publisher.fatal and not self.publisher.stopping.is_set():
            again = self.outbox.connection_lost()
            why = self.why_closing or f"connection lost ({workqueue.describe(reason)})"
            self.publisher.last_error = f"{why} on {workqueue.where(self.url)}"
            if not self.nacked_here:  # nacks were announced when they came
                unconfirmed = workqueue.plural(again, "unconfirmed message")
                self.publisher.warn("%s; reconnecting, %s will be sent again", why, unconfirmed)
        self.ioloop.stop()

    def close(self, why: str | None = None) -> None:
        """Close the connection, and drop it if the broker does not answer in CLOSE_TIMEOUT seconds.

        A broker that stopped reading from us (a blocked connection, a queue deleted under a bulk
        publish) never answers a close; waiting for it would hang the producer for good.
        """
        self.ready = self.publisher.connected = False
        if not self.connection.is_open:  # closing already, or closed
            return
        self.why_closing = self.why_closing or why
        self.cancel_timers()  # no progress and no confirm watch while it closes
        self.connection.close()
        self.call_later("close", CLOSE_TIMEOUT, self.drop_if_still_closing)

    def drop_if_still_closing(self):
        if self.connection.is_closing:
            self.publisher.warn("no answer to our close for %gs; dropping the connection", CLOSE_TIMEOUT)
            self.drop("no answer to our close")

    def drop(self, why: str) -> None:
        """Drop the connection at once (a close the broker never answers, a Producer that stops waiting)."""
        if self.connection.is_closed:
            self.ioloop.stop()
        elif self.connection.is_open or self.connection.is_closing:
            abandon(self.connection, why)
        # (still connecting: that attempt ends by itself, and run() starts no other)

    def on_blocked(self, _connection, frame):
        """A memory or disk alarm: the broker takes nothing until it lifts. Wait, no drop, no resend."""
        self.blocked = True
        reason = workqueue.printable(getattr(frame.method, "reason", "") or "a resource alarm", limit=200)
        self.publisher.last_error = f"the broker blocked publishing ({reason})"
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
            declaring = not self.declared or "inequivalent arg" in reason.reply_text  # (or a delay queue)
            if reason.reply_code == 406 and declaring:  # on declaring the work queue, or a delay queue
                waiting = self.declaring != publisher.queue  # a delay queue
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
        """Queue ready: turn on publisher confirms."""
        self.declared = True
        self.channel.confirm_delivery(ack_nack_callback=self.on_confirm, callback=self.on_confirm_mode)

    def declare_delay_queue(self, delay: int) -> None:
        """Declare a delay queue before the first publish to it, and again before a publish once
        RENEW_DELAY_QUEUE seconds have passed, which renews its x-expires lease (a publish does not), so
        that it never expires with tasks in it. Publishing goes on once the broker has answered."""
        self.declaring = target = workqueue.delay_queue(self.publisher.queue, delay)
        self.awaiting_declare = True

        def on_declared(_frame):
            self.delay_queues[target] = time.monotonic()
            self.awaiting_declare = False
            self.publish_more()

        self.channel.queue_declare(
            queue=target,
            durable=True,
            arguments=workqueue.delay_queue_arguments(self.publisher.queue, delay),
            callback=on_declared,
        )

    def on_confirm_mode(self, _frame):
        """Confirms on: start publishing, and show progress on a terminal."""
        self.ready = self.publisher.connected = True
        self.publisher.last_fatal = None
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
        """Fill the confirm window with what has come so far; close the connection once all is confirmed."""
        if not self.ready or self.awaiting_declare:  # not yet in confirm mode, declaring a delay queue, or closing
            return
        if self.nacked_here:  # publish nothing more here; once the window settles, reconnect
            if not self.outbox.unconfirmed:
                self.close()
            return
        queue_name = self.publisher.queue
        while (message := self.outbox.peek()) is not None:
            if message.properties.priority is not None and self.version < (4,):
                self.refuse_priority()
                if self.publisher.fatal:
                    return
                continue
            target = queue_name
            if message.delay:
                target = workqueue.delay_queue(queue_name, message.delay)
                if time.monotonic() - self.delay_queues.get(target, -math.inf) > RENEW_DELAY_QUEUE:
                    self.declare_delay_queue(message.delay)
                    return
            self.outbox.take()
            self.channel.basic_publish(
                exchange="",
                routing_key=target,
                body=message.body,
                properties=message.properties,
                mandatory=True,  # an unroutable message comes back instead of vanishing
            )
        if self.outbox.finished:
            self.close()

    def refuse_priority(self) -> None:
        """A priority before RabbitMQ 4: its quorum queues ignore it. new_task.py sends nothing; a Producer's
        sender gets the error."""
        release = (
            f"RabbitMQ {'.'.join(map(str, self.version))}" if self.version > (0,) else "this broker (version unknown)"
        )
        why = f"the quorum queues of {release} ignore priorities (RabbitMQ 4.0 and later take high before normal)"
        if self.outbox.peek().future is None:  # new_task.py --priority high: every task has it
            self.outbox.drop(workqueue.UsageError(""))
            self.publisher.fatal = workqueue.UsageError(f"--priority high: {why}; nothing sent")
            self.close()
        else:
            self.outbox.drop(workqueue.UsageError(f"priority: {why}; not sent"))

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

    def on_returned(self, _channel, _method, properties, _body):
        """Unroutable: the queue was deleted under us. Its ack follows; it then counts as failed."""
        self.outbox.mark_returned(properties.message_id)

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


# --- For applications ------------------------------------------------------------------


class Producer:
    """Sends tasks from a program: one Producer serves all its threads, and rides out broker restarts.

        with Producer() as producer:
            task_id = producer.send("resize photo.jpg..")
            later = producer.send("remind me", delay=3600)           # a worker sees it in an hour
            urgent = producer.send("refund #4711", priority="high")  # ahead of the waiting tasks (RabbitMQ 4)

    url: None means AMQP_URL, else amqp://localhost, as the scripts; several comma-separated URLs (a
    cluster) are tried in turn. queue and queue_type as the scripts' --queue and --queue-type.

    send() returns the task's id (its message_id) once the broker has confirmed the task, and raises a
    workqueue.WorkQueueError (the broker's words, never a password) if it is not confirmed within
    `timeout` seconds (SEND_TIMEOUT unless given, here or to send()):
      BrokerUnreachable  no connection within the timeout (why the last try failed)
      LoginRefused, AccessRefused, QueueMismatch   at once: waiting would not help
      NotConfirmed       connected, but no confirm within the timeout (a broker that blocks publishers
                         on a memory or disk alarm), or the broker refused the task (nack, unroutable)
      UsageError         a priority, before RabbitMQ 4.0 (its quorum queues ignore priorities)
    A task whose send timed out before it was published is never published; the error says if it may
    still arrive. A lost connection is reopened with backoff, and what was not confirmed is sent again:
    none lost, and none sent twice unless a connection dropped between the broker's taking it and its
    confirm (the same as new_task.py).

    Known limits: a task the broker will never take (past its max_message_size) closes the channel, and
    every task then waiting fails with it; a queue deleted under a Producer makes its tasks unroutable
    (NotConfirmed) until the next connection declares it again. A task's timestamp and due time are set
    when it is sent, not when it is published (after an outage, a delayed task is due that much earlier).

    Threads: a thread of the Producer's own owns the connection and everything in the Publisher.
    Senders touch `source` (a SimpleQueue, thread-safe) and `unsettled` under `lock` (so that nothing is
    put after close() put END), the ioloop's add_callback_threadsafe through wake() and stop() (pika's one
    thread-safe call), and their own concurrent.futures.Future, which the connection's thread resolves.
    On a timeout they read the publisher's `connected`, `last_error`, `last_fatal` and `session.blocked`:
    each one assignment of the connection's thread, read whole, for the error's words only.
    """

    def __init__(
        self,
        url: str | None = None,
        queue: str = "task_queue",
        *,
        queue_type: str = "quorum",
        timeout: float = SEND_TIMEOUT,
        persistent: bool = True,
    ):
        urls = workqueue.split_urls(url, "url") if url else workqueue.broker_urls(None)
        if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
            raise ValueError(f"timeout must be a number of seconds above 0, not {timeout!r}")
        for each in urls:
            workqueue.connection_parameters(each)  # a bad URL: a UsageError now, not at the first send
        try:
            workqueue.check_queue_name(queue, "queue")
        except workqueue.UsageError as error:
            raise ValueError(str(error)) from None
        if queue_type not in ("quorum", "classic"):
            raise ValueError(f"queue_type must be 'quorum' or 'classic', not {queue_type!r}")
        self.queue = queue
        self.queue_type = queue_type
        self.timeout = timeout
        self.persistent = persistent
        self.source: queue_module.SimpleQueue = queue_module.SimpleQueue()
        self.lock = threading.Lock()  # over `closed` and `unsettled`, and the put of a batch into `source`
        self.closed = False
        self.unsettled = 0  # tasks sent whose future is not done yet
        self.outbox = Outbox(self.source)
        self.publisher = Publisher(
            urls=urls, queue=queue, queue_type=queue_type, outbox=self.outbox, connect_timeout=0, forever=True
        )
        self.thread = threading.Thread(target=self._run, name="workqueue-producer", daemon=True)
        self.thread.start()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *_exception) -> None:
        self.close()

    def send(self, body: bytes | str, delay: float | timedelta | None = None, priority=None, timeout=None) -> str:
        """Send one task; its id once the broker has confirmed it (see the class for errors)."""
        future = self.submit(body, delay=delay, priority=priority)
        return self.result(future, self.timeout if timeout is None else timeout)

    def result(self, future: concurrent.futures.Future, seconds: float) -> str:
        """A send's task id within `seconds`, or its error (see timed_out)."""
        try:
            return future.result(seconds)
        except concurrent.futures.TimeoutError:
            error = self.timed_out(future, seconds)
            if error is None:  # it settled just now, after all
                return future.result(0)
            raise error from None

    def send_many(
        self, bodies: Iterable[bytes | str], delay: float | timedelta | None = None, priority=None, timeout=None
    ) -> list[str]:
        """Send many tasks with their confirms pipelined (up to CONFIRM_WINDOW in flight), as new_task.py
        --file does; their ids, in order. `timeout` is for the whole lot. On an error, the error's
        `task_ids` holds the ids of those confirmed before it."""
        seconds = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + seconds
        ids: list[str] = []
        in_flight: deque[concurrent.futures.Future] = deque()
        chunk: list[bytes | str] = []

        def collect(down_to: int) -> None:  # wait for the oldest until at most `down_to` are in flight
            while len(in_flight) > down_to:
                future = in_flight[0]
                try:
                    ids.append(self.result(future, max(0.0, deadline - time.monotonic())))
                except workqueue.WorkQueueError as failed:
                    error = failed
                else:
                    in_flight.popleft()
                    continue
                for waiting in in_flight:
                    waiting.cancel()  # those not yet published never are
                error.task_ids = ids
                raise error

        for body in bodies:
            chunk.append(body)
            if len(chunk) == CONFIRM_WINDOW:
                in_flight.extend(self.submit_many(chunk, delay=delay, priority=priority))
                chunk = []
                collect(4 * CONFIRM_WINDOW)  # the rest of a long iterable waits: memory stays bounded
        in_flight.extend(self.submit_many(chunk, delay=delay, priority=priority))
        collect(0)
        return ids

    def submit(self, body: bytes | str, delay=None, priority=None) -> concurrent.futures.Future:
        """Send one task without waiting: a Future of its id (see send())."""
        return self.submit_many([body], delay=delay, priority=priority)[0]

    def submit_many(self, bodies: Iterable[bytes | str], delay=None, priority=None) -> list[concurrent.futures.Future]:
        seconds, level = delay_seconds(delay), priority_level(priority)
        if level is not None and self.queue_type == "classic":
            raise ValueError(
                "priority: a classic queue takes priorities only when declared with x-max-priority; "
                "use a quorum queue (RabbitMQ 4.0 or later)"
            )
        batch = [
            message(body, delay=seconds, priority=level, persistent=self.persistent, future=concurrent.futures.Future())
            for body in bodies
        ]
        if batch:
            with self.lock:
                if self.closed:
                    raise workqueue.WorkQueueError("this Producer is closed")
                if not self.thread.is_alive():  # its connection's thread failed (a bug of ours): say so at once
                    raise self.publisher.last_fatal or workqueue.WorkQueueError("the producer's thread has ended")
                self.unsettled += len(batch)
                self.source.put(batch)
            for each in batch:  # (outside the lock: a callback of a future done already runs here and now)
                each.future.add_done_callback(self._settled)
            self.publisher.wake()
        return [each.future for each in batch]

    def _settled(self, _future: concurrent.futures.Future) -> None:
        with self.lock:
            self.unsettled -= 1

    def timed_out(self, future: concurrent.futures.Future, seconds: float) -> workqueue.WorkQueueError | None:
        """The error for a send that had no confirm within `seconds`, withdrawing the task if it was not yet
        published; None if it settled meanwhile (a confirm that came as the wait ended)."""
        withdrawn = future.cancel()  # not yet published: now it never is
        if not withdrawn and future.done():
            return None
        fate = "not sent" if withdrawn else "it may still arrive"
        publisher = self.publisher
        if publisher.connected:
            session = publisher.session
            blocked = f": {publisher.last_error}" if session is not None and session.blocked else ""
            return workqueue.NotConfirmed(f"not confirmed within {seconds:g}s{blocked} ({fate})")
        if isinstance(publisher.last_fatal, workqueue.WorkQueueError):  # a refused login, say, not yet retried
            return type(publisher.last_fatal)(f"{publisher.last_fatal} ({fate})")
        return workqueue.BrokerUnreachable(f"not sent within {seconds:g}s: {publisher.last_error} ({fate})")

    def close(self, timeout: float | None = None) -> None:
        """Wait until every task sent is confirmed (at most `timeout` seconds), then close the connection."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.source.put(END)
            nothing_to_send = self.unsettled == 0
        self.publisher.wake()
        if nothing_to_send and not self.publisher.connected:  # no broker, nothing to wait for it to confirm
            self.publisher.stop()
        self.thread.join(self.timeout if timeout is None else timeout)
        if self.thread.is_alive():  # the broker is gone, or never confirms: stop waiting
            self.publisher.stop()
            self.thread.join(CLOSE_TIMEOUT)

    def _run(self) -> None:
        """The connection's thread."""
        try:
            self.publisher.run()
        except Exception as error:  # a bug of ours: every sender learns of it, none waits for its timeout
            LOGGER.exception("the producer's connection thread failed")
            self.publisher.last_fatal = workqueue.WorkQueueError(f"the producer failed: {error!r}")
        self.outbox.fail_waiting(workqueue.WorkQueueError("the Producer was closed before the broker confirmed it"))


class AsyncProducer:
    """Producer for asyncio: `await producer.send(...)` never blocks the event loop (the connection
    lives in the Producer's own thread, and its confirm comes back as an asyncio future).

        async with AsyncProducer() as producer:
            task_id = await producer.send("resize photo.jpg..")

    The same arguments, methods and errors as Producer.
    """

    def __init__(self, url: str | None = None, queue: str = "task_queue", **options):
        self.producer = Producer(url, queue, **options)

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *_exception) -> None:
        await self.close()

    async def send(self, body: bytes | str, delay=None, priority=None, timeout=None) -> str:
        future = self.producer.submit(body, delay=delay, priority=priority)
        seconds = self.producer.timeout if timeout is None else timeout
        waiting = asyncio.wrap_future(future)
        try:  # (shielded: timed_out() decides whether the task can still be withdrawn)
            return await asyncio.wait_for(asyncio.shield(waiting), seconds)
        except asyncio.TimeoutError:
            waiting.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: no warning
            error = self.producer.timed_out(future, seconds)
            if error is None:  # it settled just now, after all
                return future.result(0)
            raise error from None

    async def send_many(self, bodies: Iterable[bytes | str], delay=None, priority=None, timeout=None) -> list[str]:
        """Producer.send_many() in a thread of the loop's executor: the same pipelining, ids and errors."""
        send = functools.partial(self.producer.send_many, list(bodies), delay, priority, timeout)
        return await asyncio.get_running_loop().run_in_executor(None, send)

    async def close(self, timeout: float | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.producer.close, timeout)


def delay_seconds(delay: float | timedelta | None) -> int:
    """A delay as whole seconds (rounded up), checked."""
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else (delay or 0)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"delay must be a number of seconds, 0 or more, not {delay!r}")
    if math.ceil(seconds) > workqueue.MAX_DELAY:
        raise ValueError(f"delay: {seconds:g}s is more than {workqueue.MAX_DELAY // 86400} days")
    return math.ceil(seconds)


def priority_level(priority: str | int | None) -> int | None:
    """'high', 'normal' (or None), or a number 0-255 as AMQP has it (RabbitMQ 4 serves 5 and above as high)."""
    if priority is None or priority in PRIORITIES:
        return PRIORITIES.get(priority)
    if isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= 255:
        return priority
    raise ValueError(f"priority must be 'high', 'normal' or 0-255, not {priority!r}")
