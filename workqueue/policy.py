"""What becomes of a task: the worker's decisions, as one pure function (no broker, no I/O).

decide() answers, for one delivery, what the worker does next: when it arrives (run it, in a child
process if it came back unacked, hand it back, or dead-letter it unrun: the crash-loop guards) and
when its run ended (ack, retry after a delay, dead-letter with the reason, hand back, or nothing
left to do). Its inputs are the run's outcome, what the message's headers say of its past (read
here, by each RabbitMQ release's counting rules), the worker's options and its state (stopping,
the channel still open). worker.py carries each decision out; tests/test_units.py checks them as a
table, with each release's headers.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import NamedTuple

from workqueue import clock, dead_letter_queue, plural, wait_queue

# RabbitMQ 4 gives every quorum queue a delivery limit of 20: a message whose x-delivery-count would
# pass it is dropped (or dead-lettered by the broker, if the queue has a dead-letter exchange).
BROKER_DELIVERY_LIMIT = 20
# The crash-loop guard's bound: a task that came back this many times without an ack goes to the
# dead-letter queue unrun, one return before RabbitMQ 4's limit would drop it without a word. A task
# that came back runs in a child process of its own, so its own deaths are failures, bounded by
# --max-retries; this bound is for what isolation cannot catch (workers killed again and again).
RETURNS_BOUND = BROKER_DELIVERY_LIMIT - 1

DEFAULT_RETRY_DELAYS = "1,10,60"  # worker.py --retry-delays: seconds before retry 1, 2, 3 and after


# --- What the headers say of a message's past -------------------------------------------------


class Returns(NamedTuple):
    """How often a quorum queue got this message back unsettled, from the headers it adds (classic queues: 0, 0).

    RabbitMQ's versions count differently (docs/reliability.md has the table):
    - 3.10 and 4.0: x-delivery-count counts every return: a consumer that died or lost its
      connection or channel, a nack, a reject.
    - 4.3: x-delivery-count counts deaths and rejects, not nacks; x-acquired-count counts every return.
    On RabbitMQ 4 a quorum queue drops (or dead-letters) a message whose x-delivery-count would pass
    20: `counted` is the figure that limit looks at, `every` the one a person wants to see."""

    counted: int = 0  # toward the broker's delivery limit
    every: int = 0  # every return, nacks included


def returns_of(properties) -> Returns:
    """From a message's properties (pika.BasicProperties): its headers."""
    headers = properties.headers or {}
    counted = headers.get("x-delivery-count", 0)
    counted = counted if is_count(counted) else 0
    every = headers.get("x-acquired-count", counted)  # absent before 4.3: x-delivery-count counts every return
    return Returns(counted, every if is_count(every) else counted)


def retries_of(properties) -> tuple[int, str | None]:
    """(failed runs so far, a complaint if the x-retries header is not a count): any client can set it."""
    value = (properties.headers or {}).get("x-retries", 0)
    if is_count(value):
        return value, None
    return 0, f"ignoring header x-retries={value!r}: not a count of retries"


def is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def due_header(when: float) -> dict:
    """The header that says when a task is due (seconds since the epoch), as due_of() reads it: x-due-at, in
    milliseconds. Set by new_task.py --delay, on a retry, and by a replay."""
    return {"x-due-at": round(when * 1000)}


def due_of(properties) -> tuple[float | None, str | None]:
    """When the task was due, in seconds since the epoch: our x-due-at header (milliseconds; set by
    new_task.py --delay and on a retry), else None; and a complaint if the header is not a time."""
    value = (properties.headers or {}).get("x-due-at")
    if value is None:
        return None, None
    if is_count(value):
        return value / 1000, None
    return None, f"ignoring header x-due-at={value!r}: not a time in milliseconds"


def queued_since(properties, due: float | None) -> float | None:
    """Since when the task has been waiting for a worker: its due time, else when it was published (the
    timestamp property, whole seconds: new_task.py sets it), else None (unknown)."""
    if due is not None:
        return due
    return properties.timestamp if is_count(properties.timestamp) else None


def is_high_priority(properties) -> bool:
    """RabbitMQ 4's quorum queues serve priorities above 4 as high, the rest as normal."""
    return is_count(properties.priority) and properties.priority > 4


class Past(NamedTuple):
    """What the worker knows of a delivery's past when it decides."""

    retries: int = 0  # failed runs before (our x-retries header)
    returns: Returns = Returns()  # came back unsettled (the broker's headers)
    timed_out: int = 0  # taken back from this worker by the broker's consumer timeout (its own count: 4.3 has none)
    due: float | None = None  # when it was due (x-due-at), in seconds since the epoch
    crashes: int = 0  # runs that killed the process running them (our x-crashes header)
    redelivered: bool = False  # the broker delivered it before (any queue type: the delivery's flag)

    @property
    def suspect(self) -> bool:
        """It came back without an ack (a worker died while holding it: perhaps of it, perhaps not), or it
        killed its process before: the next run is in a child process, where a death is the task's own."""
        return self.redelivered or self.returns.every > 0 or self.crashes > 0


def crashes_of(properties) -> tuple[int, str | None]:
    """(runs that killed the process running them: our x-crashes header, a complaint if it is not a count)."""
    value = (properties.headers or {}).get("x-crashes", 0)
    if is_count(value):
        return value, None
    return 0, f"ignoring header x-crashes={value!r}: not a count of crashes"


def past_of(properties, timed_out: int = 0, redelivered: bool = False) -> tuple[Past, str | None]:
    """The Past in a message's headers (and the delivery's redelivered flag), and a complaint about a
    header that is not what it should be."""
    retries, complaint = retries_of(properties)
    crashes, crash_complaint = crashes_of(properties)
    due, due_complaint = due_of(properties)
    complaints = "; ".join(c for c in (complaint, crash_complaint, due_complaint) if c) or None
    return Past(retries, returns_of(properties), timed_out, due, crashes, redelivered), complaints


# --- The decision ------------------------------------------------------------------------


class Options(NamedTuple):
    """The worker's options that decide."""

    max_retries: int = 3
    retry_delays: tuple[float, ...] = tuple(float(delay) for delay in DEFAULT_RETRY_DELAYS.split(","))
    auto_ack: bool = False


class Outcome(enum.Enum):
    DONE = "done"
    FAILED = "failed"
    CRASHED = "failed: it killed the child process running it"  # a failure, counted in x-crashes too
    NOT_STARTED = "not started"  # a warm shutdown began before a thread took it: it goes back
    CANNOT_RUN = "not run: no child process could start for it"  # the worker's fault, not the task's: it goes back


class Act(enum.Enum):
    RUN = "hand it to a task thread"
    RUN_IN_CHILD = "hand it to a task thread, to run in a child process of its own: if it dies, the worker lives"
    ACK = "basic.ack"
    RETRY = "publish it to a wait queue (or the queue), confirmed, then basic.ack"
    DEAD_LETTER = "publish it to <queue>.dlq with the reason, confirmed, then basic.ack"
    HAND_BACK = "basic.nack(requeue): back untouched (4.3 does not count a nack toward the delivery limit)"
    REJECT = "basic.reject(requeue): back as a failed delivery (it counts toward the delivery limit)"
    HOLD = "keep it unacked, and publish its retry or dead letter again after a pause"
    LOST = "nothing can be sent: its channel is gone, or a consumer timeout took it back; the broker redelivers it"
    FORGOTTEN = "nothing to send: with --auto-ack the broker forgot it when it delivered it"
    DROPPED = "nothing to send: its channel died before it started, or before its failure was published"


class Decision(NamedTuple):
    act: Act
    retry: int = 0  # RETRY: the x-retries it carries (1, 2, ...); DEAD_LETTER: the failed runs before
    delay: float = 0.0  # RETRY: seconds it waits first (0: straight back to the queue)
    why: str | None = None  # DEAD_LETTER: the reason (x-error); LOST: what took it
    unfinished: int = 0  # DEAD_LETTER by a guard: runs that ended with no result
    crashes: int = 0  # RETRY, DEAD_LETTER: the x-crashes it carries (0: none)


def decide(  # noqa: PLR0911 (a decision table: one return per row)
    outcome: Outcome | None,
    past: Past,
    options: Options,
    *,
    why: str | None = None,
    stopping: bool = False,
    channel_open: bool = True,
    taken_back: bool = False,
    unrecorded: bool = False,
) -> Decision:
    """What to do with a delivery. `outcome` None: it just arrived, not run yet; else how its run ended
    (`why`: why it failed). `stopping`: a warm shutdown (or --max-tasks) ended the taking of tasks.
    `channel_open`: its channel can still take an ack. `taken_back`: a consumer timeout took it back
    while it ran. `unrecorded`: its retry or dead letter could not be published."""
    if outcome is Outcome.CANNOT_RUN and taken_back:  # its tag is no longer ours to hand back
        return Decision(Act.LOST, why="the broker's consumer timeout took it back, and redelivers it")
    if outcome is Outcome.NOT_STARTED or (outcome is Outcome.CANNOT_RUN and not options.auto_ack):
        return Decision(Act.HAND_BACK if channel_open else Act.DROPPED)
    if options.auto_ack:  # the broker forgot it when it delivered it: ours alone, run it even when stopping
        return Decision(Act.RUN if outcome is None else Act.FORGOTTEN)
    if unrecorded:  # nothing runs it again before its failure is recorded, unless we are leaving
        if not channel_open:
            return Decision(Act.DROPPED)  # the broker has it back with its channel
        return Decision(Act.REJECT if stopping else Act.HOLD)
    if outcome is None:
        if stopping:
            return Decision(Act.HAND_BACK)
        unrun = unrun_because(past.returns.counted, past.timed_out, options.max_retries)
        if unrun:
            # Workers died with it again and again, or it runs longer than the consumer timeout: another
            # run would end the same way. It goes to the dead-letter queue instead, before RabbitMQ 4's
            # delivery limit would drop it without a word.
            reason, unfinished = unrun
            return Decision(Act.DEAD_LETTER, past.retries, why=reason, unfinished=unfinished, crashes=past.crashes)
        # Came back unacked: its worker died, or lost its connection, or gave it back unstarted. Which of
        # those, and whether of this task, no header tells; run alone in a child, a death will tell.
        return Decision(Act.RUN_IN_CHILD if past.suspect else Act.RUN)
    if taken_back:
        return Decision(Act.LOST, why="the broker's consumer timeout took it back, and redelivers it")
    if not channel_open:
        return Decision(Act.LOST)  # (worker.py names what is gone: the channel, or the connection)
    if outcome is Outcome.DONE:
        return Decision(Act.ACK)
    crashes = past.crashes + (outcome is Outcome.CRASHED)  # its next run, if any, is in a child too
    retry, delay = after_failure(past.retries, options.max_retries, options.retry_delays)
    if retry is None:
        return Decision(Act.DEAD_LETTER, past.retries, why=why, crashes=crashes)
    return Decision(Act.RETRY, retry, delay, crashes=crashes)


def unrun_because(returned: int, taken_back: int, max_retries: int) -> tuple[str, int] | None:
    """Before a run: (why it goes to the dead-letter queue unrun, how many runs ended unfinished), or None.

    `returned` is x-delivery-count (what the broker counts toward its limit), `taken_back` how often a
    consumer timeout took it from this worker. Each bounds only itself: returns by RETURNS_BOUND (19,
    so that the broker's limit never drops the task first), timeouts by --max-retries."""
    if taken_back > max_retries:
        return (
            f"the broker's consumer timeout took it back {taken_back} times: it runs longer than that allows",
            taken_back,
        )
    if returned > RETURNS_BOUND:
        died = "a worker died with it, lost its connection or gave it back"
        return f"it came back {plural(returned, 'time')} without an ack ({died})", returned
    return None


class Record(NamedTuple):
    """Where a failed task's retry or dead letter goes, with which headers, and what the worker says of it."""

    queue: str
    headers: dict
    what: str  # "retry 1 of 3 in 1s (at 12:00:01, waiting in task_queue.retry.1s)", "moved to task_queue.dlq"


def failure_record(decision: Decision, headers: dict, queue: str, *, max_retries: int, why: str, now: float) -> Record:
    """For Act.RETRY and Act.DEAD_LETTER: the message to publish, from the task's own headers (the broker's
    left out), before the task is acked. `now`: seconds since the epoch."""
    headers = dict(headers)
    headers["x-retries"] = decision.retry  # a retry's number; for a dead letter, the runs that failed before
    if decision.crashes:
        headers["x-crashes"] = decision.crashes  # its runs that killed their process: the next is in a child
    if decision.act is Act.RETRY:
        headers.update(due_header(now + decision.delay))  # its start shows how late it came
        if not decision.delay:
            return Record(queue, headers, f"retry {decision.retry} of {max_retries} now")
        target = wait_queue(queue, decision.delay)
        due = clock(now + decision.delay)
        return Record(
            target,
            headers,
            f"retry {decision.retry} of {max_retries} in {decision.delay:g}s (at {due}, waiting in {target})",
        )
    headers["x-error"] = (why or "")[:200]
    headers["x-original-queue"] = queue
    headers["x-failed-at"] = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds")
    if decision.unfinished:  # runs that ended with no result, this time not run (dead_letters.py counts them)
        headers["x-unfinished-runs"] = decision.unfinished
    target = dead_letter_queue(queue)
    return Record(target, headers, f"moved to {target}")


class AfterFailure(NamedTuple):
    """After a failed run: retry number `retry` after `delay` seconds (0: at once), or, with `retry`
    None, the dead-letter queue."""

    retry: int | None
    delay: float = 0.0


def after_failure(retries: int, max_retries: int, delays, final: bool = False) -> AfterFailure:
    """`retries`: failed runs before this one (x-retries); `final`: a guard's decision, no retry left."""
    if final or retries >= max_retries:
        return AfterFailure(None)
    return AfterFailure(retries + 1, retry_delay(delays, retries + 1))


def retry_delay(delays, retry: int) -> float:
    """Seconds before retry `retry` (1, 2, ...): the n-th delay, the last one repeating."""
    return delays[min(retry, len(delays)) - 1]


def wait_delays(delays, max_retries: int) -> list[float]:
    """The delays --max-retries can reach, each once, 0 (at once) left out: one wait queue each."""
    return sorted({delay for delay in (retry_delay(delays, n) for n in range(1, max_retries + 1)) if delay > 0})
