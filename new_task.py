#!/usr/bin/env python
"""Send tasks to the work queue: one from the command line, or one per line of a file.

The command line over workqueue.producer, the code that applications use as workqueue.Producer.

Every dot in a task is one second of work for worker.py. Messages are
persistent and the queue durable, so tasks survive a broker restart; a task
counts as sent only once the broker confirmed it (publisher confirms).

--delay S (or --at TIME) sends it to a delay queue, <queue>.delay.<S>s, whose TTL moves it to the
work queue at its time: until then it waits in the broker, held by no worker. --priority high
puts it before the waiting tasks, on RabbitMQ 4's quorum queues.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from datetime import time as dt_time

import workqueue
from workqueue.producer import END, PRIORITIES, RECONNECT_FOR, Outbox, Publisher, message, queued

LOGGER = logging.getLogger("new_task")

READ_CHUNK = 64 * 1024  # bytes read from the input at a time: a fast input comes in batches of lines
READ_AHEAD = 4  # batches of lines read but not yet published, at most

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


def main() -> int:
    # Ctrl+C says what the broker confirmed, even when a script started us with SIGINT ignored (as a shell
    # does for the background jobs of a script), which Python would keep.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = make_argument_parser().parse_args()
    workqueue.setup_logging()
    workqueue.check_queue_name(args.queue)
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
        lines = reader.lines
    else:
        text = " ".join(args.words) or "Hello World!"
        lines = queued([text.encode()])
    # Each line becomes a task with an id of its own, persistent (or not), delayed or urgent as asked.
    outbox = Outbox(
        lines,
        make=functools.partial(message, delay=delay, priority=PRIORITIES[args.priority], persistent=not args.transient),
    )
    publisher = Publisher(
        urls=urls,
        queue=args.queue,
        queue_type=args.queue_type,
        outbox=outbox,
        connect_timeout=args.connect_timeout,
        show_progress=bool(args.file) and sys.stderr.isatty(),
    )
    if reader:
        reader.start(wake=publisher.wake)
    try:
        publisher.run()
    except KeyboardInterrupt:  # Ctrl+C: what the broker has, and what it may not have
        if publisher.show_progress:
            sys.stderr.write("\r\033[K")
        unconfirmed = len(outbox.unconfirmed)
        maybe = f"; {unconfirmed:,} more sent, not confirmed (they may still arrive)" if unconfirmed else ""
        print(f"new_task.py: interrupted: {workqueue.plural(outbox.confirmed, 'message')} confirmed{maybe}",
              file=sys.stderr)  # fmt: skip
        raise
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
            f"{failed} of {workqueue.plural(outbox.published - outbox.resent, 'message')} not taken by the broker "
            f"({outbox.nacked} nacked, {outbox.returned} unroutable)"
        )
    due = ""
    if delay:
        at = workqueue.clock(time.time() + delay)
        due = f", due in {delay}s (about {at}; waiting in {workqueue.delay_queue(args.queue, delay)})"
    if args.file:
        print(f" [x] Sent {workqueue.plural(outbox.confirmed, 'message')}, all confirmed{due}")
        if outbox.resent:
            print(f" [x] {outbox.resent:,} were sent again after a connection drop or a nack (possible duplicates)")
    else:
        print(f" [x] Sent '{workqueue.printable(text)}'{due}")  # as the worker shows it: escape sequences inert
    return workqueue.EXIT_OK


if __name__ == "__main__":
    workqueue.run(main)
