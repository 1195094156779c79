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

Where to look: the tutorial's shape is below (dot_task, then Worker.consume, on_message and
on_task_done, where the ack is); what becomes of each delivery is decided in policy.py, and the
threads and child processes that run the tasks are in taskpool.py.
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
from datetime import datetime, timezone

import pika
from pika.adapters.blocking_connection import BlockingChannel

import policy
import workqueue
from metrics import Metrics, NoMetrics
from policy import Act, Outcome
from taskpool import CannotRunTasks, Console, Delivery, Result, TaskPool, TaskState, load_task, message_identity

LOGGER = logging.getLogger("worker")

QUICK_TASK_SECONDS = 0.005  # how long on_message waits for a lone task before going back to the connection
STEADY_SECONDS = 10.0  # a connection that lived this long resets the reconnect backoff

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


# --- The tutorial's worker: declare, qos, consume, and a callback that runs the task and acks it ----------


class Worker:
    """The tutorial's consumer, where its one callback is split in two: on_message() hands each task to a
    task thread (taskpool.TaskPool), so that a long task never stops this thread from answering heartbeats,
    and on_task_done() acks it once it has run. policy.decide() says what to do with each delivery;
    the methods here carry that out.

    Everything here but wake() runs in the main thread, which owns the connection and its channels,
    and is the only one to read or write the fields below. A task thread calls wake() alone, which
    asks this thread to look at the finished tasks through connection.add_callback_threadsafe (the
    one thread-safe call of a BlockingConnection), and reads `shutdown.requested` through
    TaskPool.may_start. The signal handler, which Python runs in this thread between two statements,
    only records a request (Shutdown).
    """

    def __init__(self, args: argparse.Namespace, tasks: TaskPool, console: Console, metrics, shutdown: Shutdown):
        self.args = args
        self.tasks = tasks
        self.metrics = metrics
        self.say = console.say
        self.shutdown = shutdown
        self.options = policy.Options(args.max_retries, tuple(args.retry_delays), args.auto_ack)
        self.dead_letter_queue = workqueue.dead_letter_queue(args.queue)
        self.started = 0  # tasks handed to the pool; --max-tasks counts these
        self.channel: BlockingChannel | None = None  # the current channel
        # Delivered and not settled yet: on the current channel, or running still after their channel died.
        self.in_hand: set[Delivery] = set()
        # Failed tasks whose retry or dead letter the broker refused: held (unacked) until published.
        self.awaiting_publish: set[Delivery] = set()
        self.publish_backoff = workqueue.Backoff()  # pauses while publishing retries or dead letters fails
        # How often a consumer timeout took each task back from us while it ran (by Delivery.identity).
        self.timed_out: dict[str, int] = {}
        self.retired: set[BlockingChannel] = set()  # channels left while tasks of theirs still run (4.3)
        self.fatal: workqueue.WorkQueueError | None = None  # why the worker gave up, once it has

    def run(self) -> int:
        """Connect, consume, and reconnect after every loss, until told to stop."""
        self.tasks.wait_ready()
        urls = workqueue.broker_urls(self.args.url)
        retry_for = self.args.connect_timeout
        backoff = workqueue.Backoff()
        while not self.shutdown.stopping:
            connected = workqueue.connect(urls, retry_for, should_stop=lambda: self.shutdown.stopping)
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
            except pika.exceptions.AMQPError as error:
                refused = workqueue.access_refused(error, url)
                if refused:
                    raise refused from None  # a reconnect cannot cure missing permissions
                if not workqueue.is_connection_lost(error):
                    raise
                self.connection_lost(connection, error)
                if time.monotonic() - opened > STEADY_SECONDS:
                    backoff.reset()
                workqueue.sleep_unless(backoff.next(), lambda: self.shutdown.stopping)  # never a tight loop
        self.finish_orphans()
        if self.fatal:
            raise self.fatal
        return workqueue.EXIT_OK

    def consume(self, connection: pika.BlockingConnection) -> None:
        """Declare the queues, take tasks until told to stop, then settle the running ones.

        A consumer that the broker cancels, or a channel it closes over a consumer timeout, is
        replaced by a fresh channel: its deliveries are the broker's again, and none of them may be
        acked (or started) on the next channel."""
        self.settle_finished()  # tasks of an earlier connection that ended meanwhile: report their lost acks
        self.tick(connection)
        while not self.shutdown.stopping:
            channel = self.channel = connection.channel()
            # The work queue, its dead-letter queue, and the wait queues where a failed task waits until
            # the broker moves it back: durable, as in the tutorial.
            for name in (self.args.queue, self.dead_letter_queue, *self.wait_queues()):
                self.declare(connection, name)
            channel.basic_qos(prefetch_count=self.args.prefetch)  # at most N unacked tasks at this worker
            channel.confirm_delivery()  # our retry and dead-letter publishes wait for the broker's OK
            if self.args.max_tasks is not None and self.started >= self.args.max_tasks:
                self.stop_taking_tasks(Phase.LAST_TASKS)  # --max-tasks 0, or all taken before a reconnect
                break
            channel.basic_consume(
                queue=self.args.queue,
                on_message_callback=self.on_message,
                auto_ack=self.args.auto_ack,
                arguments=self.consumer_arguments(),
            )
            self.metrics.consuming()  # before the line: a probe that reads it finds the worker healthy
            self.say("[*] Waiting for messages. To exit press CTRL+C")
            try:
                channel.start_consuming()  # until our consumer is cancelled, by us or by the broker
            except pika.exceptions.ChannelClosedByBroker as error:
                if not is_consumer_timeout(error):
                    raise
                self.channel_timed_out(channel, error)
            else:
                if self.shutdown.stopping:
                    break
                self.consumer_cancelled(connection, channel)
        while self.in_hand:  # a warm shutdown, or --max-tasks: the running tasks' acks go out here
            connection.process_data_events(time_limit=0.25)
            self.settle_finished()

    def on_message(self, channel: BlockingChannel, method, properties, body: bytes) -> None:
        """The tutorial's callback, first half: a task arrived; hand it to a task thread."""
        self.act_on_stop()
        delivery = self.receive(channel, method, properties, body)
        if delivery and len(self.in_hand) == 1:
            # Most tasks of a work queue are short: wait a moment, and a lone quick task is acked
            # from here at once, not after another turn of the connection's loop.
            done = self.tasks.wait_for(delivery, QUICK_TASK_SECONDS)
            if done:
                self.on_task_done(*done)
            self.settle_finished()  # any that finished meanwhile without waking us (they saw us waiting)

    def on_task_done(self, delivery: Delivery, result: Result) -> None:
        """The tutorial's callback, second half: the task's run ended (or never began, at a warm shutdown).
        Ack it, retry it, dead-letter it or hand it back, on its own channel: delivery tags are per channel."""
        self.in_hand.discard(delivery)  # first: a warm shutdown acted on now waits for the others only
        if result.outcome is Outcome.CANNOT_RUN:
            self.give_up(CannotRunTasks(f"cannot run tasks: {result.why}"))
        self.act_on_stop()  # before an ack: the broker would send the next task at once
        if result.why and result.why.startswith("time limit of"):
            self.metrics.settled("timed_out")  # counted once, whatever becomes of the task
        decision = self.decide(delivery, result.outcome, why=result.why)
        if decision.act is Act.ACK:  # done: this is where a finished task is acked
            try:
                delivery.channel.basic_ack(delivery_tag=delivery.delivery_tag)
            except pika.exceptions.AMQPError:  # the connection died just now: say so, then reconnect
                self.metrics.settled("lost")
                self.say(f"[!] Could not ack '{delivery.label}': its connection is gone; the broker redelivers it",
                         result.thread)  # fmt: skip
                raise
            self.metrics.settled("done")
            self.say(f"[x] Done '{delivery.label}' in {result.seconds:.1f}s", result.thread)
        elif decision.act in (Act.RETRY, Act.DEAD_LETTER):
            self.record_failure(delivery, decision, result.why, result.thread)
        elif decision.act is Act.HAND_BACK:
            self.hand_back(delivery)
        elif decision.act is Act.FORGOTTEN:  # --auto-ack: nothing to send
            self.metrics.settled("done" if result.outcome is Outcome.DONE else "lost")
            self.say(
                f"[x] Done '{delivery.label}' in {result.seconds:.1f}s"
                if result.outcome is Outcome.DONE
                else f"[!] Failed '{delivery.label}': {result.why} (auto-ack: the task is lost)",
                result.thread,
            )
        elif decision.act is Act.LOST:
            self.metrics.settled("lost")
            gone = "channel" if delivery.channel.connection.is_open else "connection"
            why = decision.why or f"its {gone} is gone; the broker redelivers it if it kept it"
            self.say(f"[!] Could not ack '{delivery.label}': {why}", result.thread)
        self.close_if_idle(delivery.channel)  # (Act.DROPPED: nothing to send, nothing to say)

    # From a delivery to a task thread, and back.

    def receive(self, channel: BlockingChannel, method, properties, body: bytes) -> Delivery | None:
        """Run a delivery, or hand it back, or dead-letter it unrun: the delivery if it went to a task thread."""
        timed_out = self.timed_out.get(message_identity(properties, body), 0) if method.redelivered else 0
        past, complaint = policy.past_of(properties, timed_out, method.redelivered)
        delivery = Delivery(channel, method.delivery_tag, body, properties, method.redelivered, past)
        if complaint:
            LOGGER.warning("%s (task '%s')", complaint, delivery.label)
        decision = self.decide(delivery, None)
        if decision.act is Act.HAND_BACK:
            self.hand_back(delivery)
            return None
        if decision.act is Act.DEAD_LETTER:  # a crash-loop guard: not run again
            self.record_failure(delivery, decision, decision.why, thread=0)
            return None
        delivery.in_child = decision.act is Act.RUN_IN_CHILD
        self.in_hand.add(delivery)  # before submit(): its result may come back at once
        self.tasks.submit(delivery)
        self.started += 1
        if self.args.max_tasks is not None and self.started >= self.args.max_tasks:
            self.stop_taking_tasks(Phase.LAST_TASKS)
        return delivery

    def decide(self, delivery: Delivery, outcome: Outcome | None, **facts) -> policy.Decision:
        return policy.decide(
            outcome,
            delivery.past,
            self.options,
            stopping=self.shutdown.stopping,
            channel_open=delivery.channel.is_open,
            taken_back=delivery.taken_back,
            **facts,
        )

    def wake(self, delivery: Delivery) -> None:
        """In a task thread, as its task ends: ask the connection's thread to settle it."""
        try:
            delivery.channel.connection.add_callback_threadsafe(self.settle_finished)
        except pika.exceptions.ConnectionWrongStateError:
            pass  # that connection is gone: tick() or finish_orphans() reports the lost ack

    def settle_finished(self) -> None:
        """Every task that finished and is not settled yet: on_task_done() for each."""
        while True:
            try:
                delivery, result = self.tasks.finished.get_nowait()
            except queue.Empty:
                return
            self.on_task_done(delivery, result)

    def tick(self, connection: pika.BlockingConnection) -> None:
        """Every 0.2 s, in the connection's thread: act on a signal (its handler only records it), and
        settle tasks whose wake-up could not reach us because their connection had died."""
        if not connection.is_open:
            return
        self.act_on_stop()
        self.settle_finished()
        connection.call_later(0.2, functools.partial(self.tick, connection))

    def hand_back(self, delivery: Delivery) -> None:
        """A task we hold but did not start goes back to the queue, untouched. A nack says "could not
        take it": RabbitMQ 4.3 does not count it toward the queue's delivery limit."""
        if delivery.channel.is_open:
            delivery.channel.basic_nack(delivery_tag=delivery.delivery_tag, requeue=True)
            self.say(f"[*] Handed back '{delivery.label}' untouched: shutting down")

    # A failed task: its retry or dead letter is published, confirmed, and then the task is acked.

    def record_failure(self, delivery: Delivery, decision: policy.Decision, why: str, thread: int) -> None:
        """Publish the failed task to a wait queue (or straight back) or to the DLQ, confirmed, then ack it.

        While a retry waits, no worker holds it: it sits in a durable queue whose TTL hands it back
        to the work queue when its delay is over, through a broker restart or a killed worker."""
        headers = workqueue.without_broker_headers(delivery.properties.headers)
        headers["x-retries"] = decision.retry  # a retry's number; for a dead letter, the runs that failed before
        if decision.crashes:
            headers["x-crashes"] = decision.crashes  # its runs that killed their process: the next is in a child
        if decision.act is Act.RETRY:
            retry, delay = decision.retry, decision.delay
            headers.update(policy.due_header(time.time() + delay))  # its start shows how late it came
            if delay:
                target = workqueue.wait_queue(self.args.queue, delay)
                due = workqueue.clock(time.time() + delay)
                what = f"retry {retry} of {self.args.max_retries} in {delay:g}s (at {due}, waiting in {target})"
            else:
                target, what = self.args.queue, f"retry {retry} of {self.args.max_retries} now"
        else:
            headers["x-error"] = why[:200]
            headers["x-original-queue"] = self.args.queue
            headers["x-failed-at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            if decision.unfinished:  # runs that ended with no result, this time not run (dead_letters.py counts them)
                headers["x-unfinished-runs"] = decision.unfinished
            target, what = self.dead_letter_queue, f"moved to {self.dead_letter_queue}"
        try:
            delivery.channel.basic_publish(
                exchange="",
                routing_key=target,
                body=delivery.body,
                properties=republished(delivery.properties, headers),
                mandatory=True,
            )
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as error:
            missing = isinstance(error, pika.exceptions.UnroutableError)
            refused = "no such queue" if missing else "the broker refused it"
            failed = f"[!] Failed '{delivery.label}': {why}; could not publish to {target} ({refused})"
            if self.decide(delivery, Outcome.FAILED, unrecorded=True).act is Act.REJECT:  # we are leaving
                delivery.channel.basic_reject(delivery_tag=delivery.delivery_tag, requeue=True)
                self.say(f"{failed}; handed it back: shutting down", thread)
                return
            # Act.HOLD: its failure is not recorded yet: we keep the delivery (unacked, it holds its prefetch
            # slot) and publish again after a pause that grows while publishing keeps failing. Handing it back
            # would run it again at once, and count toward RabbitMQ 4's delivery limit.
            pause = self.publish_backoff.next()
            self.say(f"{failed}; trying again in {pause:g}s", thread)
            self.awaiting_publish.add(delivery)
            again = functools.partial(self.publish_again, delivery, decision, why, thread, target if missing else None)
            delivery.channel.connection.call_later(pause, again)
            return
        except pika.exceptions.AMQPError:  # the connection died just now: say so, then reconnect
            self.metrics.settled("lost")
            self.say(f"[!] Failed '{delivery.label}': {why}; could not record it, its connection is gone; "
                     "the broker redelivers it", thread)  # fmt: skip
            raise
        self.publish_backoff.reset()
        try:
            delivery.channel.basic_ack(delivery_tag=delivery.delivery_tag)
        except pika.exceptions.AMQPError:  # recorded, but the ack died with the connection: it runs again too
            self.metrics.settled("lost")
            self.say(f"[!] Failed '{delivery.label}': {why}; published to {target}, but the ack was lost "
                     "with its connection: the broker redelivers it too", thread)  # fmt: skip
            raise
        self.metrics.settled("retried" if decision.act is Act.RETRY else "dead_lettered")
        self.say(f"[!] Failed '{delivery.label}': {why}; {what}", thread)

    def publish_again(
        self, delivery: Delivery, decision: policy.Decision, why: str, thread: int, declare: str | None
    ) -> None:
        """After a pause: publish a failed task's retry or dead letter again, declaring its queue first
        if it had gone (deleted under us)."""
        if delivery not in self.awaiting_publish:
            return  # handed back by a warm shutdown meanwhile
        self.awaiting_publish.discard(delivery)
        if not delivery.channel.is_open:
            return  # its channel died: the broker has it back, and redelivers it
        if declare:
            try:
                self.declare(delivery.channel.connection, declare)
            except pika.exceptions.ChannelClosedByBroker as error:  # say why; the publish fails again, later
                LOGGER.warning("could not declare %s again: %s", declare, workqueue.describe(error))
        self.record_failure(delivery, decision, why, thread)

    def wait_queues(self) -> dict[str, float]:
        """The wait queue of each delay that --max-retries can reach: {name: delay}."""
        delays = policy.wait_delays(self.args.retry_delays, self.args.max_retries)
        return {workqueue.wait_queue(self.args.queue, delay): delay for delay in delays}

    def declare(self, connection: pika.BlockingConnection, name: str) -> None:
        """Declare one of our queues (the work queue, a wait queue, the dead-letter queue) by its name."""
        if name == self.dead_letter_queue:
            workqueue.declare_dead_letter_queue(connection, self.args.queue, self.args.queue_type)
            return
        delays = self.wait_queues()
        with workqueue.short_channel(connection) as channel:
            if name in delays:
                arguments = workqueue.wait_queue_arguments(self.args.queue, self.args.queue_type, delays[name])
            else:
                arguments = workqueue.queue_arguments(self.args.queue_type)
            channel.queue_declare(queue=name, durable=True, arguments=arguments)

    # Shutdown: the signal handler records the request; stop_taking_tasks() acts on it.

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
            self.shutdown.give_up()

    def act_on_stop(self) -> None:
        """A warm shutdown was asked for and a consumer still runs: act now. Called at the connection
        thread's next chance: in tick(), on_message(), and before an ack (an ack would let the broker send
        the next task, only for it to go back). With no consumer (after --max-tasks, between channels,
        while reconnecting) there is nothing to cancel: no task starts anyway, and each task that waits
        for a thread goes back as a thread reaches it (Outcome.NOT_STARTED)."""
        channel = self.channel
        if (
            self.shutdown.requested is not None
            and self.shutdown.phase is not Phase.STOPPING
            and channel is not None
            and channel.is_open
            and channel.consumer_tags
        ):
            self.stop_taking_tasks(Phase.STOPPING)

    def stop_taking_tasks(self, phase: Phase) -> None:
        """The one place the shutdown state changes, and what each change asks for is done (see Shutdown)."""
        self.shutdown.phase = phase
        self.metrics.lost(str(self.fatal) if self.fatal else "shutting down")  # /healthz says why
        channel = self.channel
        if channel and channel.is_open:
            for tag in list(channel.consumer_tags):
                # Cancel first: a task handed back while the consumer still runs would come straight
                # back to it, and go back a second time. Deliveries pika had not handed to on_message yet
                # it rejects itself (requeue); an auto-ack consumer's come back to us: ours alone, they run.
                for method, properties, body in channel.basic_cancel(tag):
                    self.receive(channel, method, properties, body)
        if phase is Phase.STOPPING and not self.args.auto_ack:
            for delivery in list(self.in_hand):
                if self.tasks.drop(delivery):  # still waiting for a thread
                    self.in_hand.discard(delivery)
                    self.hand_back(delivery)
        for delivery in list(self.awaiting_publish):  # failed, and not recorded yet: back to the queue
            self.awaiting_publish.discard(delivery)
            if delivery.channel.is_open:
                delivery.channel.basic_reject(delivery_tag=delivery.delivery_tag, requeue=True)
                self.say(f"[*] Handed back '{delivery.label}' (its failure was not recorded yet): shutting down")
        if phase is Phase.STOPPING and self.in_hand:
            running = workqueue.plural(len(self.in_hand), "running task")
            self.say(f"[*] Finishing {running} first (press CTRL+C again to quit now)")

    # When the broker takes tasks back: a lost connection, a cancelled consumer, a consumer timeout.

    def connection_lost(self, connection: pika.BlockingConnection, error: BaseException) -> None:
        """The connection died: its tasks not started must not run, and the running ones' acks are lost."""
        self.drop_not_started()
        running = len(self.in_hand) if not self.args.auto_ack else 0
        LOGGER.warning("connection lost: %s; reconnecting%s", workqueue.describe(error), lost_acks(running))
        self.metrics.lost(f"broker lost ({workqueue.describe(error)}): reconnecting")
        if connection.is_open:
            try:
                connection.close()
            except pika.exceptions.AMQPError:
                pass

    def drop_not_started(self) -> None:
        """The channel died: its deliveries still waiting for a thread must not run (the broker has
        requeued them), and nothing of that channel may be acked on the next one."""
        self.awaiting_publish = {d for d in self.awaiting_publish if d.channel.is_open}  # the broker has the rest
        if self.args.auto_ack:
            return  # auto-acked tasks are ours alone: do them rather than lose them
        for delivery in list(self.in_hand):
            if self.tasks.drop(delivery):
                self.in_hand.discard(delivery)

    def finish_orphans(self) -> None:
        """Leaving while disconnected: let the running tasks end (their acks are lost), then go."""
        while self.in_hand:
            self.on_task_done(*self.tasks.finished.get())

    def channel_timed_out(self, channel: BlockingChannel, error: pika.exceptions.ChannelClosedByBroker) -> None:
        """Before 4.3: the broker closed the channel over a consumer timeout, and every task it held is the
        broker's again."""
        taken_back = self.oldest_running(channel)
        timeout = re.search(r"Timeout value used: (\d+) ms", error.reply_text)
        limit = f" of {int(timeout[1]) / 1000:g}s" if timeout else ""
        why = f"the broker's consumer timeout{limit} took back our tasks; {self.consumer_timeout_hint()}"
        self.leave_channel(channel, why, taken_back)
        self.wait_for_a_free_thread(channel.connection, taken_back)

    def consumer_cancelled(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> None:
        """The broker cancelled our consumer: its queue was deleted, its node went down, or (4.3) a
        consumer timeout took a task back."""
        why, taken_back = self.why_cancelled(connection, channel)
        self.leave_channel(channel, why, taken_back)
        self.wait_for_a_free_thread(connection, taken_back)

    def wait_for_a_free_thread(self, connection: pika.BlockingConnection, taken_back: Delivery | None) -> None:
        """The task taken back comes straight back to us: consume again once a thread is free to run it,
        or it waits past the timeout again."""
        while taken_back and self.running() >= self.args.concurrency and not self.shutdown.stopping:
            connection.process_data_events(time_limit=0.25)
            self.settle_finished()

    def running(self) -> int:
        return sum(1 for delivery in self.in_hand if delivery.state is TaskState.RUNNING)

    def oldest_running(self, channel: BlockingChannel) -> Delivery | None:
        """The task of this channel held longest: the first a consumer timeout takes back."""
        running = [d for d in self.in_hand if d.channel is channel and d.state is TaskState.RUNNING]
        return min(running, key=lambda delivery: delivery.received, default=None)

    def consumer_timeout_hint(self) -> str:
        if self.args.consumer_timeout is not None:
            return f"for tasks this long, raise --consumer-timeout (now {self.args.consumer_timeout:g}s; RabbitMQ 4.3)"
        return "for tasks this long, raise the broker's consumer_timeout, or give --consumer-timeout (RabbitMQ 4.3)"

    def consumer_arguments(self) -> dict:
        """x-consumer-timeout (RabbitMQ 4.3; older brokers ignore it): how long the broker lets this
        consumer hold a task unacked before it takes the task back."""
        if self.args.consumer_timeout is None:
            return {}
        return {"x-consumer-timeout": round(self.args.consumer_timeout * 1000)}

    def why_cancelled(
        self, connection: pika.BlockingConnection, channel: BlockingChannel
    ) -> tuple[str, Delivery | None]:
        """The broker cancelled our consumer, and basic.cancel carries no reason: tell the usual ones
        apart. Returns what to say, and the task a consumer timeout took back (None if it was not one)."""
        oldest = self.oldest_running(channel)
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
                f"most likely a consumer timeout took it back; {self.consumer_timeout_hint()}"
            )
            return why, oldest
        return (
            "the broker cancelled our consumer (its queue was deleted and declared again, or the node holding "
            "it is down); consuming again",
            None,
        )

    def leave_channel(self, channel: BlockingChannel, why: str, taken_back: Delivery | None) -> None:
        """Say why, and consume on a fresh channel from now on.

        A channel that the broker closed took its tasks back: those not started are dropped, the
        running ones' acks are lost. A channel whose consumer the broker cancelled (4.3) stays
        open for its running tasks' acks; its tasks not started go back now, and it is closed once
        it holds none. A task a consumer timeout took back is not acked, and counted (see receive())."""
        if taken_back:
            taken_back.taken_back = True
            self.timed_out[taken_back.identity] = self.timed_out.get(taken_back.identity, 0) + 1
            if len(self.timed_out) > 10_000:  # remember the most recent ones
                del self.timed_out[next(iter(self.timed_out))]
        if channel.is_open:
            for delivery in [d for d in self.in_hand if d.channel is channel]:
                if self.tasks.drop(delivery):
                    self.in_hand.discard(delivery)
                    channel.basic_nack(delivery.delivery_tag, requeue=True)
            self.retired.add(channel)
            self.close_if_idle(channel)
            lost = 1 if taken_back else 0
        else:
            self.drop_not_started()
            lost = sum(1 for d in self.in_hand if d.channel is channel)
        LOGGER.warning("%s%s", why, lost_acks(lost))
        self.metrics.lost(why)

    def close_if_idle(self, channel: BlockingChannel) -> None:
        """Close a channel we left, once no task of it is in hand any more."""
        if channel in self.retired and not any(d.channel is channel for d in self.in_hand | self.awaiting_publish):
            self.retired.discard(channel)
            if channel.is_open:
                try:
                    channel.close()
                except pika.exceptions.AMQPError:
                    pass


class Phase(enum.Enum):
    TAKING = "taking tasks"
    LAST_TASKS = "--max-tasks reached"
    STOPPING = "warm shutdown"


class Shutdown:
    """Whether the worker takes tasks: one state, and what each phase allows.

    - TAKING: deliveries come; each is started by a task thread, and acked (or retried, dead-lettered)
      when it ends.
    - LAST_TASKS (--max-tasks reached): the consumer is cancelled; every task taken is started, run and
      acked; a delivery that still reaches on_message goes back (nack; pika rejects itself the ones it
      held at the cancel).
    - STOPPING (the first Ctrl+C or SIGTERM): the consumer is cancelled; no task starts; every task held
      and not started goes back (nack), untouched; the running ones finish and are acked; a failed task
      whose retry could not be published goes back (reject). Then the worker exits 0.
    (A second signal is a cold shutdown: the worker exits at once, acking nothing.)

    Who writes what: `requested` is written once, by the signal handler or give_up() (both in the
    connection's thread), and read by every thread (a
    task thread asks tasks_may_start() before it starts a task): from then on the worker is stopping.
    `phase` belongs to the connection's thread; Worker.stop_taking_tasks() is the one place that changes
    it and acts on the change, as soon as a consumer runs to be cancelled (Worker.act_on_stop).
    """

    def __init__(self, auto_ack: bool):
        self.requested: int | None = None  # the signal that asked for a warm shutdown (0: the worker itself)
        self.signalled = False  # a first SIGINT or SIGTERM came: the next is a cold shutdown
        self.phase = Phase.TAKING
        self.auto_ack = auto_ack

    @property
    def stopping(self) -> bool:
        """No more tasks are taken: asked for, or acted on."""
        return self.requested is not None or self.phase is not Phase.TAKING

    def give_up(self) -> None:
        """A warm shutdown the worker asks of itself (Worker.give_up): a request like a signal's."""
        if self.requested is None:
            self.requested = 0

    def tasks_may_start(self) -> bool:
        """In any thread. After a signal no task starts, except auto-acked ones: the broker forgot them."""
        return self.requested is None or self.auto_ack


# --- Helpers ----------------------------------------------------------------------------------


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


def republished(properties: pika.BasicProperties, headers: dict) -> pika.BasicProperties:
    """The task's own properties (message_id, correlation_id, content_type...) with new headers.

    Not its expiration: that was for the wait before its first delivery, and in a wait queue or the
    dead-letter queue it would make the broker drop the task (as RabbitMQ's own dead-lettering does)."""
    properties = copy.copy(properties)
    properties.headers = headers
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
        + "  130/143  second Ctrl+C / SIGTERM: cold shutdown\n\n"
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
