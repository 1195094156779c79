#!/usr/bin/env python
"""Take tasks from the work queue and do them: one at a time, or --concurrency N at once.

The default task sleeps one second per dot in the message; it fails on the word
"error", hangs on "hang" and kills its own process on "crash", so that every
fault can be tried. --task runs a function of yours instead.

How it stays correct where the tutorial's worker is not:
- tasks run in a pool of threads, so pika keeps answering heartbeats during a
  long task; only the connection's thread talks to the broker, and a delivery is
  acked on the channel it came on or not at all;
- a lost connection is reported and re-opened with capped backoff; deliveries of
  the dead channel that had not started are dropped (the broker redelivers them);
- a failed task waits in a wait queue (--retry-delays) and comes back with its
  attempt count in a header; after --max-retries it goes to the dead-letter
  queue <queue>.dlq; so does a task whose workers died running it again and again;
- --time-limit runs tasks in child processes, killed and replaced at the limit;
- Ctrl+C (or SIGTERM) starts no new task and finishes the running ones; a second
  one quits at once.

Where to look: the tutorial's shape is below: dot_task, then Consumer (one channel: declare, qos,
basic_consume, and the callback in two halves, on_message and on_task_done; settle() is where every
ack goes out; on_message counts the tasks started and stops at --max-tasks), then Worker (the
connection: reconnects, results back from the task threads, stop()), then Shutdown (the state a
signal asks to change), then main() (options, the pool, the signal handlers). What becomes of each
delivery is decided in workqueue/policy.py; the threads and child processes that run the tasks are in
workqueue/taskpool.py.
"""

from __future__ import annotations

import argparse
import copy
import enum
import faulthandler
import functools
import logging
import os
import queue
import re
import signal
import time
from collections.abc import Callable

import pika
from pika.adapters.blocking_connection import BlockingChannel

import workqueue
from workqueue import policy
from workqueue.metrics import Metrics, NoMetrics
from workqueue.policy import Act, Outcome
from workqueue.taskpool import (
    CannotRunTasks,
    Console,
    Delivery,
    Result,
    TaskPool,
    TaskState,
    load_task,
    message_identity,
)

LOGGER = logging.getLogger("worker")

QUICK_TASK_SECONDS = 0.005  # how long on_message waits for a lone task before going back to the connection
STEADY_SECONDS = 10.0  # a connection that lived this long resets the reconnect backoff
CANCEL_TURN_SECONDS = 0.05  # a stop's cancel waits for a turn of the connection this long that brings no task
CANCEL_TURNS = 20  # (at most this many turns: see Consumer.cancel); long enough for a busy machine

EXAMPLES = """\
examples:
  python worker.py                          # one second of work per dot
  python worker.py --name w1                # label this worker's lines
  python worker.py --concurrency 8          # up to 8 tasks at once (I/O-bound tasks)
  python worker.py --time-limit 300         # stop a task after 5 minutes (it runs in a child process)
  python worker.py --retry-delays 5,60      # retry a failed task after 5 s, then every 60 s
  python worker.py --prefetch 0             # no limit: plain round-robin
  python worker.py --auto-ack               # the tutorial's first worker: a crash loses tasks
  python worker.py --task mytasks:resize    # call mytasks.resize(body) for each task
  DOT_SECONDS=0.1 python worker.py --max-tasks 10
"""


# --- The tutorial's task: one second of work per dot -------------------------------------------------


class TaskFailed(Exception):
    pass


def dot_task(seconds_per_dot: float) -> Callable[[bytes], None]:
    """The tutorial's fake work: one unit of time per dot. To try the faults: the word 'error'
    fails, 'hang' never returns (try --time-limit), 'crash' kills the process running it."""

    def sleep_per_dot(body: bytes) -> None:
        seconds = body.count(b".") * seconds_per_dot
        if seconds:  # even sleep(0) gives up the GIL: skip it for empty tasks
            time.sleep(seconds)
        if re.search(rb"\bhang\b", body, re.IGNORECASE):
            time.sleep(10**6)  # blocked where no exception can reach it
        if re.search(rb"\bcrash\b", body, re.IGNORECASE):
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        if re.search(rb"\berror\b", body, re.IGNORECASE):
            raise TaskFailed("the task says 'error'")

    return sleep_per_dot


# --- The tutorial's worker, for one channel: declare, qos, consume, a callback that runs the task, an ack -----


class Consumer:
    """One channel, the consumer on it, and the deliveries it brought, until each is settled.

    A fresh one for each channel (as pika's asynchronous consumer example makes one per connection, and
    Dramatiq one per reconnect): when the channel dies, the Consumer is dropped with all it held, and a
    delivery is only ever acked on the channel it came on, by its own Consumer. settle() is the one
    place a delivery is acked, nacked, rejected, or published again, carrying out policy.decide()'s
    decision. Our consumer is cancelled once the tasks the broker sent have reached on_message (cancel()),
    so that those go back through settle() too; pika rejects, itself, only what it has not handed over
    when the cancel goes out.

    Main thread only, like the Worker.
    """

    def __init__(self, worker: Worker, connection: pika.BlockingConnection):
        self.worker = worker
        self.args = worker.args
        self.say = worker.say
        self.in_hand: set[Delivery] = set()  # delivered here, given to the pool, not settled yet
        self.held: set[Delivery] = set()  # failed, and the broker refused their retry or dead letter: unacked
        self.consuming = False  # our consumer is on; False once cancelled, by us or by the broker
        self.cancelling = False  # a stop asked for our cancel, which waits for pika to hand us what it read (cancel())
        self.received = 0  # deliveries that reached on_message
        # What waits for that cancel: hand-backs (sent now, they would come straight back), and finished tasks
        # (an ack now would let the broker send one more)
        self.back_after_cancel: list[Delivery] = []
        self.done_before_cancel: list[tuple[Delivery, Result]] = []
        self.cancelled_by_broker = False
        self.channel = connection.channel()
        # The work queue, its dead-letter queue, and the wait queues where a failed task waits until the
        # broker moves it back: durable, as in the tutorial.
        self.wait_queues = wait_queues(self.args)  # {name: delay}
        for name in (self.args.queue, *self.wait_queues):  # (a refusal, 406, ends the worker: exit 5)
            self.channel.queue_declare(queue=name, durable=True, arguments=self.arguments(name))
        workqueue.declare_dead_letter_queue(connection, self.args.queue, self.args.queue_type)  # (its own channel)
        self.prefetch = worker.prefetch()
        self.channel.basic_qos(prefetch_count=self.prefetch)  # at most N unacked tasks at this worker
        self.channel.confirm_delivery()  # our retry and dead-letter publishes wait for the broker's OK
        self.channel.add_on_cancel_callback(self.on_cancelled_by_broker)

    def consume(self) -> Delivery | None:
        """basic_consume and start_consuming, until our consumer is cancelled (by us: a stop, --max-tasks;
        or by the broker) or the broker closes the channel (a consumer timeout before 4.3). Returns the
        task a consumer timeout took back, if one did."""
        self.channel.basic_consume(
            queue=self.args.queue,
            on_message_callback=self.on_message,
            auto_ack=self.args.auto_ack,
            arguments=consumer_arguments(self.args.consumer_timeout),
        )
        self.consuming = True
        self.worker.metrics.consuming()  # before the line: a probe that reads it finds the worker healthy
        self.say("[*] Waiting for messages. To exit press CTRL+C")
        try:
            self.channel.start_consuming()
        except pika.exceptions.ChannelClosedByBroker as error:
            self.consuming = False
            if not is_consumer_timeout(error):
                raise
            return self.closed_by_consumer_timeout(error)
        self.consuming = False
        if self.cancelled_by_broker:
            return self.cancelled()
        return None

    def on_message(self, channel: BlockingChannel, method, properties, body: bytes) -> None:
        """The tutorial's callback, first half: a task arrived; hand it to a task thread."""
        worker = self.worker
        self.received += 1
        worker.stop()
        timed_out = worker.timed_out.get(message_identity(properties, body), 0) if method.redelivered else 0
        past, complaint = policy.past_of(properties, timed_out, method.redelivered)
        delivery = Delivery(channel, method.delivery_tag, body, properties, method.redelivered, past, consumer=self)
        if complaint:
            LOGGER.warning("%s (task '%s')", complaint, delivery.label)
        decision = self.decide(delivery, None)
        if decision.act not in (Act.RUN, Act.RUN_IN_CHILD):  # back untouched, or a crash-loop guard's dead letter
            self.settle(delivery, decision, decision.why)
            return
        delivery.in_child = decision.act is Act.RUN_IN_CHILD
        self.in_hand.add(delivery)  # before submit(): its result may come back at once
        worker.tasks.submit(delivery)
        worker.started += 1
        if worker.took_enough():
            worker.metrics.lost("shutting down")  # /healthz: --max-tasks reached, the last tasks finish
            self.stop_taking_tasks()
        elif len(self.in_hand) == 1:
            # Most tasks of a work queue are short: wait a moment, and a lone quick task is acked
            # from here at once, not after another turn of the connection's loop.
            done = worker.tasks.wait_for(delivery, QUICK_TASK_SECONDS)
            if done:
                worker.on_task_done(*done)
            worker.settle_finished()  # any that finished meanwhile without waking us (they saw us waiting)

    def on_task_done(self, delivery: Delivery, result: Result) -> None:
        """The tutorial's callback, second half: the task's run ended (or never began): decide, and settle."""
        self.in_hand.discard(delivery)  # first: a stop acted on now counts the tasks still running
        if self.consuming:  # (not after the cancel: give_back() calls us, and a stop there would call it again)
            self.worker.stop()  # before an ack: the broker would send the next task at once
        if self.cancelling:  # its ack now would let the broker send us one more task before the cancel
            self.done_before_cancel.append((delivery, result))
            return
        try:
            if result.why and result.why.startswith("time limit of"):
                self.worker.metrics.settled("timed_out", delivery)  # counted once, whatever becomes of the task
            decision = self.decide(delivery, result.outcome, why=result.why)
            self.settle(delivery, decision, result.why, seconds=result.seconds, thread=result.thread)
        finally:  # (also when the connection died under the ack: its line is out)
            self.worker.console.said(delivery)  # its thread's next Received line, if it waited for this one's
        self.close_if_idle()

    def decide(self, delivery: Delivery, outcome: Outcome | None, **facts) -> policy.Decision:
        return policy.decide(
            outcome,
            delivery.past,
            self.worker.options,
            # The state, not the request: a signal that lands between stop() and here (its handler only
            # records it) must not hand a task back while our consumer is still on: it would come straight back.
            stopping=self.worker.shutdown.state is State.STOPPING or self.worker.took_enough(),
            taken_back=delivery.taken_back,
            **{"channel_open": self.channel.is_open, **facts},
        )

    # The one place a delivery is settled.

    def settle(
        self, delivery: Delivery, decision: policy.Decision, why: str | None, seconds: float = 0.0, thread: int = 0
    ) -> None:
        """Carry out a decision of policy.decide() on this channel: ack, nack, reject, or publish the retry or
        dead letter (confirmed) and then ack. A failure whose publish the broker refuses is decided again."""
        act, label, metrics = decision.act, delivery.label, self.worker.metrics
        if act is Act.HAND_BACK and self.cancelling:  # sent now, it could come straight back to our consumer
            self.back_after_cancel.append(delivery)
            return
        self.held.discard(delivery)
        if act in (Act.RETRY, Act.DEAD_LETTER):
            record = policy.failure_record(
                decision,
                workqueue.without_broker_headers(delivery.properties.headers),
                self.args.queue,
                max_retries=self.args.max_retries,
                why=why,
                now=time.time(),
            )
            try:
                refused = self.publish(delivery, record)
            except pika.exceptions.AMQPError:  # the connection died just now: say so, then reconnect
                metrics.settled("lost", delivery)
                self.say(f"[!] Failed '{label}': {why}; could not record it, its connection is gone; "
                         "the broker redelivers it", thread)  # fmt: skip
                raise
            if refused:
                failed = f"[!] Failed '{label}': {why}; could not publish to {record.queue} ({refused})"
                again = self.decide(delivery, Outcome.FAILED, unrecorded=True)
                if again.act is Act.HOLD:
                    declare = record.queue if refused == "no such queue" else None  # deleted under us: declare it
                    pause = self.hold(delivery, decision, why, thread, declare)
                    self.say(f"{failed}; trying again in {pause:g}s", thread)
                else:  # Act.REJECT (we are leaving), or Act.DROPPED (its channel died: the broker has it)
                    self.say(failed, thread)
                    self.settle(delivery, again, why, thread=thread)
                return
            self.worker.publish_backoff.reset()
            try:
                self.channel.basic_ack(delivery_tag=delivery.delivery_tag)
            except pika.exceptions.AMQPError:  # recorded, but the ack died with the connection: it runs again too
                metrics.settled("lost", delivery)
                self.say(f"[!] Failed '{label}': {why}; published to {record.queue}, but the ack was lost "
                         "with its connection: the broker redelivers it too", thread)  # fmt: skip
                raise
            metrics.settled("retried" if act is Act.RETRY else "dead_lettered", delivery)
            self.say(f"[!] Failed '{label}': {why}; {record.what} [id {delivery.short_id}]", thread)
        elif act is Act.ACK:  # done: this is where a finished task is acked
            try:
                self.channel.basic_ack(delivery_tag=delivery.delivery_tag)
            except pika.exceptions.AMQPError:  # the connection died just now: say so, then reconnect
                metrics.settled("lost", delivery)
                self.say(f"[!] Could not ack '{label}': its connection is gone; the broker redelivers it", thread)
                raise
            metrics.settled("done", delivery)
            self.say(f"[x] Done '{label}' in {seconds:.1f}s", thread)
        elif act is Act.HAND_BACK:  # a task not started: back to the queue, untouched
            self.channel.basic_nack(delivery_tag=delivery.delivery_tag, requeue=True)
            if self.worker.shutdown.asked:
                self.say(f"[*] Handed back '{label}' untouched: shutting down")
        elif act is Act.REJECT:  # a failure not recorded, and we are leaving: back, to run again
            self.channel.basic_reject(delivery_tag=delivery.delivery_tag, requeue=True)
            self.say(f"[*] Handed back '{label}' (its failure was not recorded yet): shutting down", thread)
        elif act is Act.FORGOTTEN:  # --auto-ack: nothing to send
            done = why is None
            metrics.settled("done" if done else "lost", delivery)
            self.say(f"[x] Done '{label}' in {seconds:.1f}s" if done else
                     f"[!] Failed '{label}': {why} (auto-ack: the task is lost)", thread)  # fmt: skip
        elif act is Act.LOST:
            metrics.settled("lost", delivery)
            gone = "channel" if self.channel.connection.is_open else "connection"
            lost = decision.why or f"its {gone} is gone; the broker redelivers it if it kept it"
            self.say(f"[!] Could not ack '{label}': {lost}", thread)
        # (Act.DROPPED: nothing to send, nothing to say)

    def publish(self, delivery: Delivery, record: policy.Record) -> str | None:
        """Publish a failed task's retry or dead letter, confirmed: None once the broker has it, else why not."""
        try:
            self.channel.basic_publish(
                exchange="",
                routing_key=record.queue,
                body=delivery.body,
                properties=republished(delivery.properties, record.headers, delivery.task_id),
                mandatory=True,
            )
        except pika.exceptions.UnroutableError:
            return "no such queue"
        except pika.exceptions.NackError:
            return "the broker refused it"
        return None

    def hold(self, delivery: Delivery, decision: policy.Decision, why, thread: int, declare: str | None) -> float:
        """Act.HOLD: keep a failure the broker would not take (unacked, in its prefetch slot), and publish it again
        after a pause that grows while publishing keeps failing; returns the pause. Handing it back would run it
        again at once, and count toward the delivery limit."""
        pause = self.worker.publish_backoff.next()
        self.held.add(delivery)
        again = functools.partial(self.publish_again, delivery, decision, why, thread, declare)
        self.channel.connection.call_later(pause, again)
        return pause

    def publish_again(self, delivery, decision, why, thread, declare: str | None) -> None:
        if delivery not in self.held or not self.channel.is_open:
            return  # settled meanwhile (handed back by a warm shutdown), or its channel died: the broker has it
        if declare:
            try:
                self.declare(self.channel.connection, declare)
            except pika.exceptions.ChannelClosedByBroker as error:  # say why; the publish fails again, later
                LOGGER.warning("could not declare %s again: %s", declare, workqueue.describe(error))
        self.settle(delivery, decision, why, thread=thread)

    # Stopping, and what the broker takes back.

    def stop_taking_tasks(self) -> None:
        """A stop, or --max-tasks reached: cancel our consumer, then hand back the tasks not started (at a stop)
        and the failures not recorded. Cancel first: a task handed back while the consumer still runs would come
        straight back to it. And not now (cancel()): pika would reject, itself, the deliveries the broker has
        sent and it has not handed to on_message yet."""
        if self.consuming and self.channel.is_open:
            if not self.cancelling:
                self.cancelling = True
                self.channel.connection.call_later(0, functools.partial(self.cancel, CANCEL_TURNS, None))
            return
        self.give_back()

    def cancel(self, turns: int = 0, received: int | None = None) -> None:
        """Cancel our consumer once no more tasks are on their way to it; then hand back what waited for the
        cancel. That is certain when we hold as many unsettled tasks as our prefetch allows: the broker sends
        no more. Otherwise this waits, CANCEL_TURN_SECONDS a turn of the connection, for a turn that brings no
        task (at most `turns`: a quick producer and no prefetch limit could keep them coming). What pika has
        not handed to on_message when the cancel goes out (a task still arriving, one read in this very turn,
        what the broker sends before it sees the cancel) it rejects itself. An auto-ack consumer's deliveries
        that came meanwhile are returned to us instead (ours alone, they run): it cancels at once."""
        if not self.cancelling:
            return  # done already
        if self.consuming and self.channel.is_open and self.channel.consumer_tags:
            more_may_come = not (self.args.auto_ack or self.window_full())
            if more_may_come and turns and received != self.received:  # the first turn, or one that brought tasks
                again = functools.partial(self.cancel, turns - 1, self.received)
                self.channel.connection.call_later(CANCEL_TURN_SECONDS, again)
                return
            for tag in list(self.channel.consumer_tags):
                for method, properties, body in self.channel.basic_cancel(tag):
                    self.on_message(self.channel, method, properties, body)
        self.consuming = self.cancelling = False
        self.give_back()

    def give_back(self, **facts) -> None:
        """Our consumer is off: hand back the tasks that came after the stop, those not started (at a stop),
        and the failures not recorded; then settle the tasks that finished while the cancel was on its way."""
        # One at a time, each left in its list until it is settled: close_if_idle() (after each ack) sees the
        # rest, and if the connection dies under one, channel_gone() finds the others.
        while self.back_after_cancel:
            delivery = self.back_after_cancel[0]  # (in the order they came)
            self.settle(delivery, self.decide(delivery, Outcome.NOT_STARTED, **facts), None)
            self.back_after_cancel.remove(delivery)
        if self.worker.shutdown.asked:
            self.give_back_waiting(**facts)
        self.give_back_held(**facts)
        while self.done_before_cancel:
            delivery, result = self.done_before_cancel.pop(0)
            self.on_task_done(delivery, result)

    def give_back_waiting(self, **facts) -> None:
        """Every task held here that no thread has started: policy decides (hand back; drop if the channel died)."""
        if self.args.auto_ack:
            return  # auto-acked tasks are ours alone: do them rather than lose them
        for delivery in sorted(self.in_hand, key=lambda each: each.delivery_tag):  # in the order they came
            if self.worker.tasks.drop(delivery):  # still waiting for a thread: it never will
                self.in_hand.discard(delivery)
                self.worker.started -= 1
                self.settle(delivery, self.decide(delivery, Outcome.NOT_STARTED, **facts), None)

    def give_back_held(self, **facts) -> None:
        """Every failure held while its record was refused: policy decides (reject as we leave; drop if the
        channel died)."""
        for delivery in sorted(self.held, key=lambda each: each.delivery_tag):
            self.settle(delivery, self.decide(delivery, Outcome.FAILED, unrecorded=True, **facts), None)

    def channel_gone(self) -> None:
        """The channel (or its connection) died: the broker has every task it held back. Nothing is sent."""
        self.consuming = self.cancelling = False
        self.give_back_waiting(channel_open=False)  # (whether stopping or not: none of them may start now)
        self.give_back(channel_open=False)

    def on_cancelled_by_broker(self, _method_frame) -> None:
        """basic.cancel from the broker: its queue was deleted, its node went down, or (4.3) a consumer timeout
        took a task back. In pika's I/O: only note it; start_consuming() returns, and consume() goes on."""
        self.cancelled_by_broker = True

    def cancelled(self) -> Delivery | None:
        """The broker cancelled our consumer. The channel stays open for the running tasks' acks; its tasks not
        started go back now, and it is closed once it holds none."""
        why, taken_back = self.why_cancelled()
        running = self.took_back(taken_back)  # first: a task that finished as our own cancel waited is not acked now
        if self.cancelling:  # a stop's cancel was on its way, and the broker's came first: finish the stop's work
            self.cancelling = False
            self.give_back()
        self.give_back_waiting()
        self.close_if_idle()
        LOGGER.warning("%s%s", why, lost_acks(1 if running else 0))
        self.worker.metrics.lost(why)
        return taken_back

    def closed_by_consumer_timeout(self, error: pika.exceptions.ChannelClosedByBroker) -> Delivery | None:
        """Before 4.3: the broker closed the channel over a consumer timeout, and took back every task it held."""
        taken_back = self.oldest_unacked()
        hint = self.timeout_hint(taken_back)
        self.took_back(taken_back)
        self.channel_gone()
        timeout = re.search(r"Timeout value used: (\d+) ms", error.reply_text)
        limit = f" of {int(timeout[1]) / 1000:g}s" if timeout else ""
        why = f"the broker's consumer timeout{limit} took back our tasks; {hint}"
        LOGGER.warning("%s%s", why, lost_acks(len(self.in_hand)))
        self.worker.metrics.lost(why)
        return taken_back

    def timeout_hint(self, oldest: Delivery | None) -> str:
        if oldest is not None and oldest in self.held:
            return f"the oldest, '{oldest.label}', was a failure we held while its record was refused: it runs again"
        return consumer_timeout_hint(self.args)

    def took_back(self, delivery: Delivery | None) -> bool:
        """A consumer timeout took this task back: not ours to settle any more. A running one is counted (see
        on_message: a task that keeps running past the timeout is dead-lettered); a failure we held, whose
        record the broker refused, just runs again. True if it was running (its ack is lost)."""
        if delivery is None:
            return False
        if delivery in self.held:
            self.held.discard(delivery)
            return False
        delivery.taken_back = True
        timed_out = self.worker.timed_out
        timed_out[delivery.identity] = timed_out.get(delivery.identity, 0) + 1
        if len(timed_out) > 10_000:  # remember the most recent ones
            del timed_out[next(iter(timed_out))]
        return True

    def why_cancelled(self) -> tuple[str, Delivery | None]:
        """basic.cancel carries no reason: tell the usual ones apart. Returns what to say, and the task a
        consumer timeout took back (None if it was not one)."""
        oldest = self.oldest_unacked()
        connection = self.channel.connection
        for attempt in range(1 if oldest else 4):  # a queue being deleted can still answer for a moment (4.3)
            if attempt:
                connection.sleep(0.25)
            try:
                with workqueue.short_channel(connection) as probe:
                    probe.queue_declare(queue=self.args.queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker as error:
                if error.reply_code != 404:
                    raise
                deleted = (
                    f"the broker cancelled our consumer: queue '{self.args.queue}' was deleted; declaring it again"
                )
                return deleted, None
        held_for = time.monotonic() - oldest.received if oldest else 0.0
        known = self.args.consumer_timeout
        if oldest and (known is None or held_for >= known - 1):
            # RabbitMQ 4.3 cancels the consumer, rather than close the channel, when a task is held too long.
            why = (
                f"the broker cancelled our consumer while it held '{oldest.label}' for {held_for:.0f}s: "
                f"most likely a consumer timeout took it back; {self.timeout_hint(oldest)}"
            )
            return why, oldest
        return (
            "the broker cancelled our consumer (its queue was deleted and declared again, or the node holding "
            "it is down); consuming again",
            None,
        )

    # Our queues: the work queue, its dead-letter queue, and the wait queues of the retries.

    def declare(self, connection: pika.BlockingConnection, name: str) -> None:
        """Declare one of our queues (the work queue, a wait queue, the dead-letter queue) by its name."""
        if name == workqueue.dead_letter_queue(self.args.queue):
            workqueue.declare_dead_letter_queue(connection, self.args.queue, self.args.queue_type)
            return
        with workqueue.short_channel(connection) as channel:
            channel.queue_declare(queue=name, durable=True, arguments=self.arguments(name))

    def arguments(self, name: str) -> dict:
        """The declaration arguments of the work queue or one of its wait queues."""
        if name in self.wait_queues:
            return workqueue.wait_queue_arguments(self.args.queue, self.args.queue_type, self.wait_queues[name])
        return workqueue.queue_arguments(self.args.queue_type)

    def running(self) -> int:
        return sum(1 for delivery in self.in_hand if delivery.state is TaskState.RUNNING)

    def window_full(self) -> bool:
        """We hold as many unsettled tasks as our prefetch allows: the broker sends us no more until one is settled."""
        unsettled = len(self.in_hand) + len(self.held) + len(self.back_after_cancel) + len(self.done_before_cancel)
        return bool(self.prefetch) and unsettled >= self.prefetch

    def oldest_unacked(self) -> Delivery | None:
        """The task held unacked longest, running, a failure held, or finished as a stop's cancel waited: the first
        a consumer timeout takes back."""
        finished = [delivery for delivery, _ in self.done_before_cancel]
        unacked = [d for d in self.in_hand if d.state is TaskState.RUNNING] + list(self.held) + finished
        return min(unacked, key=lambda delivery: delivery.received, default=None)

    def close_if_idle(self) -> None:
        """Close the channel once our consumer is gone and no task of it is in hand any more."""
        holding = self.in_hand or self.held or self.back_after_cancel or self.done_before_cancel
        if not self.consuming and not holding and self.channel.is_open:
            try:
                self.channel.close()
            except pika.exceptions.AMQPError:
                pass


# --- The connection: reconnects, --max-tasks, shutdown ---------------------------------------------------


class Worker:
    """The connection, and what outlives its channels. The per-channel work is the Consumer's, above.

    Opens the connection (again after every loss), makes a fresh Consumer for each channel, counts the
    tasks started for --max-tasks, and turns a stop request into the stopping state (stop()).

    Every method but wake() runs in the main thread, which owns the connection, its channels and every
    field here and in each Consumer. A task thread calls wake() alone: it asks this thread to look at
    the finished tasks through connection.add_callback_threadsafe (the one thread-safe call of a
    BlockingConnection). The signal handler, which Python runs in this thread between two statements,
    only records a request (Shutdown) and the /healthz text, or exits at once on a second signal.
    """

    def __init__(self, args: argparse.Namespace, tasks: TaskPool, console: Console, metrics, shutdown: Shutdown):
        self.args = args
        self.tasks = tasks
        self.metrics = metrics
        self.console = console
        self.say = console.say
        self.shutdown = shutdown
        self.options = policy.Options(args.max_retries, tuple(args.retry_delays), args.auto_ack)
        self.started = 0  # tasks handed to the pool, less those dropped before they started: --max-tasks counts these
        # The consumers that still hold deliveries: the one taking tasks (the last), and any the broker
        # cancelled while tasks of theirs still ran (4.3). A consumer whose channel died holds none that
        # need it: its running tasks' results still reach it (Delivery.consumer), to say their acks are lost.
        self.consumers: list[Consumer] = []
        # How often a consumer timeout took each task back from us while it ran (by Delivery.identity): it
        # outlives the channel by design, since the broker redelivers the task on the next one.
        self.timed_out: dict[str, int] = {}
        self.publish_backoff = workqueue.Backoff()  # pauses while publishing retries or dead letters fails
        self.fatal: workqueue.WorkQueueError | None = None  # why the worker gave up, once it has

    def run(self) -> int:
        """Connect, consume, and reconnect after every loss, until told to stop."""
        self.tasks.wait_ready()
        urls = workqueue.broker_urls(self.args.url)
        retry_for = self.args.connect_timeout
        backoff = workqueue.Backoff()
        # Until stopped or --max-tasks reached (a drop before a start gives a task back); --max-tasks 0 connects
        # once, to declare the queues and take nothing.
        while not self.shutdown.asked and (self.args.max_tasks == 0 or not self.took_enough()):
            connected = workqueue.connect(urls, retry_for, should_stop=lambda: self.shutdown.asked)
            if connected is None:
                break
            if retry_for is None:  # a connection opened again after a loss (a try that a stop cut short is none)
                self.metrics.reconnected()
            connection, url = connected
            retry_for = None  # once connected, a later loss is retried until we are stopped
            opened = time.monotonic()
            try:
                self.consume(connection)
                connection.close()
                break
            except pika.exceptions.AMQPError as error:
                refused = workqueue.access_refused(error, url)
                if refused:
                    raise refused from None  # a reconnect cannot cure missing permissions
                if not workqueue.is_connection_lost(error):
                    raise
                self.connection_lost(connection, error)
                self.settle_finished()  # say now what became of the tasks that ended: not after the outage
                if time.monotonic() - opened > STEADY_SECONDS:
                    backoff.reset()
                workqueue.sleep_unless(backoff.next(), lambda: self.shutdown.asked)  # never a tight loop
        self.stop()  # (if asked for while disconnected: the state says so; there is nothing to cancel)
        while self.holding():  # leaving while disconnected: let the running tasks end (their acks are lost)
            self.on_task_done(*self.tasks.finished.get())
        if self.fatal:
            raise self.fatal
        return workqueue.EXIT_OK

    def consume(self, connection: pika.BlockingConnection) -> None:
        """Take tasks on a fresh Consumer (channel) after each one the broker cancels or closes, until told
        to stop or --max-tasks is reached; then let the running tasks end, and their acks go out."""
        self.settle_finished()  # tasks of an earlier connection that ended meanwhile: report their lost acks
        self.tick(connection)
        while True:
            if not self.shutdown.asked and not self.took_enough():
                consumer = Consumer(self, connection)
                self.consumers.append(consumer)
                taken_back = consumer.consume()  # until our consumer is cancelled, by us or the broker
                self.wait_for_a_free_thread(connection, taken_back)
            elif self.holding():  # a warm shutdown, or --max-tasks: the running tasks' acks go out here
                connection.process_data_events(time_limit=0.25)
                self.settle_finished()
                self.notice_closed_channels()  # (a channel that died dropped its waiting tasks: took_enough() may turn)
            elif not self.consumers and self.args.max_tasks == 0:
                Consumer(self, connection).close_if_idle()  # --max-tasks 0: declare the queues, take nothing
                return
            else:
                return

    def prefetch(self) -> int:
        """--prefetch, but never more than --max-tasks has left to start: a task the broker sends past the last
        one goes back unrun, and 3.10 and 4.0 count that toward the task's returns. The broker applies it to a
        new consumer only, so with --max-tasks above --prefetch an ack near the end can still let one more
        come, and go back."""
        if self.args.max_tasks is None:
            return self.args.prefetch
        left = max(self.args.max_tasks - self.started, 1)
        return min(self.args.prefetch, left) if self.args.prefetch else left  # (0 is no limit)

    def took_enough(self) -> bool:
        return self.args.max_tasks is not None and self.started >= self.args.max_tasks

    def holding(self) -> bool:
        """Tasks of ours still run (or wait for a thread), on any channel."""
        return any(consumer.in_hand for consumer in self.consumers)

    def notice_closed_channels(self) -> None:
        """A channel the broker closed while we were not consuming on it (a consumer timeout while the last
        tasks run, a cancelled consumer's channel) raises nowhere: drop what it held, as for any dead channel.
        And forget the consumers that hold nothing any more."""
        for consumer in self.consumers:
            if not consumer.channel.is_open:
                consumer.channel_gone()
        self.consumers = [c for c in self.consumers if c.in_hand or c.channel.is_open]

    # Finished tasks: from a task thread back to the connection's thread, and to the consumer they came from.

    def wake(self, delivery: Delivery) -> None:
        """In a task thread, as its task ends: ask the connection's thread to settle it."""
        try:
            delivery.channel.connection.add_callback_threadsafe(self.settle_finished)
        except pika.exceptions.ConnectionWrongStateError:
            pass  # that connection is gone: tick() or run() reports the lost ack

    def settle_finished(self) -> None:
        """Every task that finished and is not settled yet: its consumer's on_task_done()."""
        while True:
            try:
                delivery, result = self.tasks.finished.get_nowait()
            except queue.Empty:
                return
            self.on_task_done(delivery, result)

    def on_task_done(self, delivery: Delivery, result: Result) -> None:
        if result.outcome in (Outcome.NOT_STARTED, Outcome.CANNOT_RUN):
            self.started -= 1  # --max-tasks counts tasks started
        if result.outcome is Outcome.CANNOT_RUN:
            self.give_up(CannotRunTasks(f"cannot run tasks: {result.why}"))
        delivery.consumer.on_task_done(delivery, result)

    def tick(self, connection: pika.BlockingConnection) -> None:
        """Every 0.2 s, in the connection's thread: act on a signal (its handler only records it), and
        settle tasks whose wake-up could not reach us because their connection had died."""
        if not connection.is_open:
            return
        self.settle_finished()  # first: a stop acted on now counts only the tasks still running
        self.notice_closed_channels()
        self.stop()
        connection.call_later(0.2, functools.partial(self.tick, connection))

    def wait_for_a_free_thread(self, connection: pika.BlockingConnection, taken_back: Delivery | None) -> None:
        """The task a consumer timeout took back comes straight back to us: consume again once a thread is
        free to run it, or it waits past the timeout again."""
        while taken_back and self.running() >= self.args.concurrency and not self.shutdown.asked:
            connection.process_data_events(time_limit=0.25)
            self.settle_finished()

    def running(self) -> int:
        return sum(consumer.running() for consumer in self.consumers)

    # Shutdown: the signal handler records the request; stop() alone acts on it.

    def on_signal(self, signum, _frame) -> None:
        """The first SIGINT or SIGTERM asks for a warm shutdown, the second quits at once."""
        if self.shutdown.signalled:  # the second signal (a stop the worker asked of itself is not one)
            os.write(2, f"{self.args.name} [!] Cold shutdown: exiting now; unacked tasks are requeued\n".encode())
            os._exit(128 + signum)
        self.shutdown.signalled = True
        if self.shutdown.requested is None:
            self.shutdown.requested = signum  # one assignment: from now on no task starts (TaskPool reads it)
        if self.fatal is None:  # for /healthz at once, even while reconnecting (one assignment too)
            self.metrics.problem = "shutting down"
        os.write(1, f"{self.args.name} [*] Warm shutdown: taking no new tasks\n".encode())

    def give_up(self, error: workqueue.WorkQueueError) -> None:
        """The worker cannot go on (no child process starts: every task would fail for our fault, and be
        dead-lettered as its own): take no more tasks, hand back those not started, finish the running
        ones, then exit with `error`'s code. A supervisor may start it again."""
        if self.fatal is None:
            self.fatal = error
            self.metrics.problem = str(error)
            LOGGER.error("%s; taking no more tasks, and handing back those not started", error)
            if self.shutdown.requested is None:
                self.shutdown.requested = 0  # a request like a signal's (0: the worker's own)

    def stop(self) -> None:
        """The one place the shutdown state changes: once a stop was asked for, at the connection thread's
        next chance (tick(), a delivery, before an ack, or leaving): every consumer stops taking tasks and
        hands back those not started; the running ones finish."""
        if not self.shutdown.asked or self.shutdown.state is State.STOPPING:
            return
        self.shutdown.state = State.STOPPING
        self.metrics.lost(str(self.fatal) if self.fatal else "shutting down")  # /healthz says why
        for consumer in self.consumers:
            consumer.stop_taking_tasks()
        running = self.running()
        if running:
            self.say(
                f"[*] Finishing {workqueue.plural(running, 'running task')} first (press CTRL+C again to quit now)"
            )

    def connection_lost(self, connection: pika.BlockingConnection, error: BaseException) -> None:
        """The connection died, and every channel with it: no task of theirs that waits may start, and the
        running ones' acks are lost."""
        for consumer in self.consumers:
            consumer.channel_gone()
        running = 0 if self.args.auto_ack else sum(len(consumer.in_hand) for consumer in self.consumers)
        LOGGER.warning("connection lost: %s; reconnecting%s", workqueue.describe(error), lost_acks(running))
        self.metrics.lost(f"broker lost ({workqueue.describe(error)}): reconnecting")
        if connection.is_open:
            try:
                connection.close()
            except pika.exceptions.AMQPError:
                pass


class State(enum.Enum):
    TAKING = "taking tasks"
    STOPPING = "warm shutdown"


class Shutdown:
    """Whether the worker takes tasks: one state, TAKING or STOPPING, and the request that turns it.

    - TAKING: deliveries come; each is started by a task thread, and acked (or retried, dead-lettered)
      when it ends. (--max-tasks is not a shutdown: once N tasks have started the consumer is cancelled,
      and the worker exits when they end.)
    - STOPPING (the first Ctrl+C or SIGTERM, or Worker.give_up()): the consumers are cancelled; no task
      starts; every task held and not started goes back (nack), untouched; the running ones finish and
      are acked; a failed task whose retry could not be published goes back (reject). Then the worker exits.
    (A second signal is a cold shutdown: the worker exits at once, acking nothing.)

    Who writes what: `requested` is written once, by the signal handler or give_up() (both in the
    connection's thread), and read by every thread (a task thread asks tasks_may_start() before it
    starts a task): from then on no task starts. `state` is written in one place, Worker.stop(), which
    acts on the request at the connection thread's next chance.
    """

    def __init__(self, auto_ack: bool):
        self.requested: int | None = None  # the signal that asked for a warm shutdown (0: the worker itself)
        self.signalled = False  # a first SIGINT or SIGTERM came: the next is a cold shutdown
        self.state = State.TAKING
        self.auto_ack = auto_ack

    @property
    def asked(self) -> bool:
        """A stop was asked for: no task is taken from now on."""
        return self.requested is not None

    def tasks_may_start(self) -> bool:
        """In any thread. After a request no task starts, except auto-acked ones: the broker forgot them."""
        return self.requested is None or self.auto_ack


# --- Helpers ----------------------------------------------------------------------------------


def wait_queues(args: argparse.Namespace) -> dict[str, float]:
    """The wait queue of each delay that --max-retries can reach: {name: delay}."""
    delays = policy.wait_delays(args.retry_delays, args.max_retries)
    return {workqueue.wait_queue(args.queue, delay): delay for delay in delays}


def consumer_timeout_hint(args: argparse.Namespace) -> str:
    if args.consumer_timeout is not None:
        return f"for tasks this long, raise --consumer-timeout (now {args.consumer_timeout:g}s; RabbitMQ 4.3)"
    return "for tasks this long, raise the broker's consumer_timeout, or give --consumer-timeout (RabbitMQ 4.3)"


def consumer_arguments(consumer_timeout: float | None) -> dict:
    """x-consumer-timeout (RabbitMQ 4.3; older brokers ignore it): how long the broker lets this
    consumer hold a task unacked before it takes the task back."""
    if consumer_timeout is None:
        return {}
    return {"x-consumer-timeout": round(consumer_timeout * 1000)}


def is_consumer_timeout(error: BaseException) -> bool:
    """RabbitMQ before 4.3 closes the channel when a delivery stays unacked past its consumer timeout."""
    return (
        isinstance(error, pika.exceptions.ChannelClosedByBroker)
        and error.reply_code == 406
        and "acknowledgement" in error.reply_text
        and "timed out" in error.reply_text
    )


def lost_acks(running: int) -> str:
    if not running:
        return ""
    if running == 1:
        return " (1 task still running: its ack is lost, so the broker will redeliver it if it kept it)"
    return f" ({running} tasks still running: their acks are lost, so the broker will redeliver them if it kept them)"


def republished(properties: pika.BasicProperties, headers: dict, task_id: str) -> pika.BasicProperties:
    """The task's own properties (message_id, correlation_id, content_type...) with new headers; a task that
    came without an id gets `task_id`, so that its retries and its dead letter can be told apart.

    Not its expiration: that was for the wait before its first delivery, and in a wait queue or the
    dead-letter queue it would make the broker drop the task (as RabbitMQ's own dead-lettering does)."""
    properties = copy.copy(properties)
    properties.headers = headers
    properties.message_id = task_id
    properties.expiration = None
    properties.delivery_mode = properties.delivery_mode or pika.DeliveryMode.Persistent
    if properties.user_id is not None:
        # The broker refuses a user_id other than the publisher's own: keep it as a header instead.
        headers.setdefault("x-user-id", properties.user_id)
        properties.user_id = None
    return properties


def serve_metrics(args: argparse.Namespace) -> Metrics:
    """--metrics-port: Prometheus metrics and /healthz, from a thread of their own."""
    try:
        return Metrics(args.queue, args.metrics_host, args.metrics_port)
    except ImportError as error:
        raise workqueue.UsageError(
            f"--metrics-port needs prometheus-client ({error}): pip install -r requirements.txt"
        ) from None
    except OSError as error:
        raise workqueue.UsageError(
            f"--metrics-port {args.metrics_port}: cannot listen on {args.metrics_host}: {error.strerror}"
        ) from None


# --- Start-up: options, the task, the pool, signals ----------------------------------------------


def main() -> int:
    args = make_argument_parser().parse_args()
    workqueue.setup_logging(args.name)
    workqueue.check_queue_name(args.queue)
    if args.auto_ack and args.max_tasks is not None:
        raise workqueue.UsageError(
            "--max-tasks cannot be exact with --auto-ack: the broker hands an auto-ack consumer every "
            "waiting task at once, and a task it handed over cannot go back"
        )
    if args.prefetch is None:
        args.prefetch = args.concurrency
    if args.time_limit is not None and args.isolation == "thread":
        raise workqueue.UsageError(
            "--time-limit needs --isolation process: a thread cannot be stopped, a child process can"
        )
    args.isolation = args.isolation or ("process" if args.time_limit is not None else "thread")
    if args.consumer_timeout is None and args.time_limit is not None and args.prefetch:
        # Each task it holds may wait for the ones before it, each up to the time limit.
        rounds = -(-args.prefetch // args.concurrency)
        args.consumer_timeout = rounds * args.time_limit + 60
    for url in workqueue.broker_urls(args.url):
        workqueue.connection_parameters(url)  # a bad URL is a usage error, before connecting
    make_task = (load_task, args.task) if args.task else (dot_task, args.dot_seconds)
    task = make_task[0](make_task[1])  # a --task that cannot be loaded: a usage error, before anything starts
    if args.auto_ack:
        LOGGER.warning("auto-ack: the broker forgets each task when it is delivered; a crash loses it")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 PID: where is each thread stuck?
    console = Console(args.name, show_threads=args.concurrency > 1)
    metrics = serve_metrics(args) if args.metrics_port else NoMetrics()
    shutdown = Shutdown(args.auto_ack)
    tasks = TaskPool(args, task, make_task, console=console, metrics=metrics, may_start=shutdown.tasks_may_start)
    worker = Worker(args, tasks, console, metrics, shutdown)
    tasks.wake = worker.wake
    signal.signal(signal.SIGINT, worker.on_signal)
    signal.signal(signal.SIGTERM, worker.on_signal)
    try:
        return worker.run()
    finally:
        tasks.kill_children()


def make_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Consume tasks from a durable RabbitMQ work queue, with manual acks.",
        epilog=EXAMPLES
        + "\n"
        + workqueue.EXIT_CODES_HELP
        + "  worker.py: a first Ctrl+C or SIGTERM is a warm shutdown (0 once the running tasks end);\n"
        + "  130/143  a second one: cold shutdown\n\n"
        + "kill -USR1 PID prints every thread's stack (is a task stuck?); the worker goes on.\n",
        formatter_class=workqueue.HelpFormatter,
    )
    parser.add_argument(
        "--name",
        default=f"w{os.getpid()}",
        help="label on every line this worker prints",
    )
    parser.add_argument(
        "--concurrency",
        type=workqueue.number(int, minimum=1),
        default=1,
        metavar="N",
        help="tasks run at once, each in a thread of its own; lines then name the thread: w1/2",
    )
    parser.add_argument(
        "--prefetch",
        type=workqueue.non_negative(int),
        metavar="N",
        help="unacknowledged tasks the broker may give this worker at once; 0 = no limit "
        "(default: the --concurrency value)",
    )
    parser.add_argument(
        "--auto-ack",
        action="store_true",
        help="let the broker forget each task as soon as it is delivered (a crash loses it)",
    )
    parser.add_argument(
        "--dot-seconds",
        type=workqueue.non_negative(float),
        default=os.environ.get("DOT_SECONDS", "1"),  # argparse checks a string default with `type` too
        metavar="S",
        help="seconds of work per dot in the default task (env DOT_SECONDS; 1 if unset)",
    )
    parser.add_argument(
        "--task",
        metavar="MODULE:FUNCTION",
        help="call FUNCTION(body: bytes) from MODULE for each task; returning = done, raising = failed",
    )
    parser.add_argument(
        "--max-retries",
        type=workqueue.non_negative(int),
        default=3,
        metavar="N",
        help="times a failed task is tried again before it goes to the dead-letter queue <queue>.dlq",
    )
    parser.add_argument(
        "--retry-delays",
        type=delays,
        default=policy.DEFAULT_RETRY_DELAYS,
        metavar="LIST",
        help="seconds a failed task waits before retry 1, 2, ...; the last repeats; 0 = at once. Each delay has a "
        "wait queue, <queue>.retry.<delay>s; one no longer used stays: remove it with "
        "python delete_queue.py task_queue.retry.60s --if-empty",
    )
    parser.add_argument(
        "--time-limit",
        type=workqueue.number(float, minimum=0.001),
        metavar="S",
        help="a task still running after S seconds is stopped and counts as failed (implies --isolation process)",
    )
    parser.add_argument(
        "--isolation",
        choices=("thread", "process"),
        help="run each task in a thread of the worker (the default: cheapest), or in a child process that "
        "can be killed and replaced (the default with --time-limit)",
    )
    parser.add_argument(
        "--consumer-timeout",
        type=workqueue.number(float, minimum=1),
        metavar="S",
        help="ask the broker to let this worker hold a task unacked for S seconds before it takes the task "
        "back (RabbitMQ 4.3 takes it; older brokers apply their consumer_timeout, 30 min by default); "
        "default with --time-limit: enough for every task it may hold",
    )
    parser.add_argument(
        "--max-tasks",
        type=workqueue.non_negative(int),
        metavar="N",
        help="start exactly N tasks, finish them, and exit 0",
    )
    parser.add_argument(
        "--connect-timeout",
        type=workqueue.non_negative(float),
        default=30.0,
        metavar="S",
        help="seconds to keep trying to reach the broker at start (later losses: retried until stopped)",
    )
    parser.add_argument(
        "--metrics-port",
        type=workqueue.number(int, minimum=1, maximum=65535),
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics and a health check at /healthz",
    )
    parser.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST", help="address for --metrics-port")
    workqueue.add_connection_arguments(parser)
    workqueue.add_queue_arguments(parser)
    return parser


def delays(text: str) -> list[float]:
    """--retry-delays: comma-separated seconds, each 0 or more."""
    parse = workqueue.non_negative(float)
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"want seconds separated by commas, like 1,10,60: {text!r}")
    return [parse(part) for part in parts]


if __name__ == "__main__":
    workqueue.run(main)
