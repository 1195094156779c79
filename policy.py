"""What becomes of a task: the worker's decisions, as pure functions (no broker, no I/O).

- Before a delivery runs, a crash-loop guard may send it to the dead-letter queue unrun: when it
  came back unacked too often (x-delivery-count: its workers died with it), or when the broker's
  consumer timeout took it back too often (the worker's own count; RabbitMQ 4.3 does not count it).
- After a run failed, it is retried (after its delay, in a wait queue) or, past --max-retries,
  dead-lettered.

worker.py carries each decision out; tests/test_units.py checks them as a table.
"""

from __future__ import annotations

from typing import NamedTuple

# RabbitMQ 4 gives every quorum queue a delivery limit of 20: a message whose x-delivery-count would
# pass it is dropped (or dead-lettered by the broker, if the queue has a dead-letter exchange).
BROKER_DELIVERY_LIMIT = 20

DEFAULT_RETRY_DELAYS = "1,10,60"  # worker.py --retry-delays: seconds before retry 1, 2, 3 and after


def unrun_because(returned: int, taken_back: int, max_retries: int) -> tuple[str, int] | None:
    """Before a run: (why it goes to the dead-letter queue unrun, how many runs ended unfinished), or None.

    `returned` is x-delivery-count (what the broker counts toward its limit), `taken_back` how often a
    consumer timeout took it from this worker. Each bounds only itself; deaths stop at 19 at most, so
    the broker's limit never drops the task first."""
    if taken_back > max_retries:
        return (
            f"the broker's consumer timeout took it back {taken_back} times: it runs longer than that allows",
            taken_back,
        )
    if returned > min(max_retries, BROKER_DELIVERY_LIMIT - 1):
        died = "a worker died with it, lost its connection or gave it back"
        return f"it came back {returned} times without an ack ({died})", returned
    return None


class AfterFailure(NamedTuple):
    """After a failed run: retry number `retry` after `delay` seconds (0: at once), or, with `retry`
    None, the dead-letter queue."""

    retry: int | None
    delay: float = 0.0


def after_failure(retries: int, max_retries: int, delays: list[float], final: bool = False) -> AfterFailure:
    """`retries`: failed runs before this one (x-retries); `final`: a guard's decision, no retry left."""
    if final or retries >= max_retries:
        return AfterFailure(None)
    return AfterFailure(retries + 1, retry_delay(delays, retries + 1))


def retry_delay(delays: list[float], retry: int) -> float:
    """Seconds before retry `retry` (1, 2, ...): the n-th delay, the last one repeating."""
    return delays[min(retry, len(delays)) - 1]


def wait_delays(delays: list[float], max_retries: int) -> list[float]:
    """The delays --max-retries can reach, each once, 0 (at once) left out: one wait queue each."""
    return sorted({delay for delay in (retry_delay(delays, n) for n in range(1, max_retries + 1)) if delay > 0})
