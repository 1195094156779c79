"""The work queue as a library: Producer and AsyncProducer send tasks from an application
(workqueue/producer.py); policy, taskpool and metrics are the worker's parts.

This module is the plumbing shared by the scripts (new_task.py, worker.py, delete_queue.py, ...).
The scripts show how a work queue works; this module keeps them robust:
settings and broker URLs, connecting with retries, the one queue declaration
every script uses, turning pika's exceptions into a few named errors with
documented exit codes, and logging. Passwords never leave this module: every
URL shown to a person goes through ``redact()``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import select
import signal
import ssl
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

import pika
import pika.exceptions

LOGGER = logging.getLogger(__name__)

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
DEFAULT_QUEUE = "task_queue"
QUEUE_TYPES = ("quorum", "classic")

# Exit codes, the same for every script (docs/production.md has this table too).
EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_LOGIN_REFUSED = 4
EXIT_QUEUE_MISMATCH = 5
EXIT_NOT_CONFIRMED = 6
EXIT_NO_SUCH_QUEUE = 7
EXIT_QUEUE_IN_USE = 8
EXIT_ACCESS_REFUSED = 9
EXIT_CANNOT_RUN_TASKS = 10

EXIT_CODES_HELP = """\
exit codes:
  0  done                        4  login refused (user, password or vhost)
  1  unexpected error            5  queue exists with other arguments
  2  bad usage                   6  broker did not confirm a message
  3  broker unreachable          7  no such queue (delete_queue.py)
                                 8  queue not empty / in use (delete_queue.py)
                                 9  access refused (the user's permissions)
                                10  cannot run tasks (worker.py: no child process starts)
  130  interrupted (Ctrl+C)     141  the reader of the output went away (| head)
"""


# --- Errors -----------------------------------------------------------------


class WorkQueueError(Exception):
    """An error a user can act on: one line on stderr and a documented exit code."""

    exit_code = EXIT_UNEXPECTED


class UsageError(WorkQueueError):
    exit_code = EXIT_USAGE


class BrokerUnreachable(WorkQueueError):
    exit_code = EXIT_UNREACHABLE


class LoginRefused(WorkQueueError):
    exit_code = EXIT_LOGIN_REFUSED


class AccessRefused(WorkQueueError):
    exit_code = EXIT_ACCESS_REFUSED


class QueueMismatch(WorkQueueError):
    exit_code = EXIT_QUEUE_MISMATCH


class NotConfirmed(WorkQueueError):
    exit_code = EXIT_NOT_CONFIRMED


class NoSuchQueue(WorkQueueError):
    exit_code = EXIT_NO_SUCH_QUEUE


class QueueInUse(WorkQueueError):
    exit_code = EXIT_QUEUE_IN_USE


def queue_mismatch(queue: str, broker_text: str, waiting: bool = False) -> QueueMismatch:
    """Explain a 406 PRECONDITION_FAILED from queue_declare: what differs and how to fix it. `waiting`:
    a queue where tasks wait (a delay queue): remove it only once it is empty."""
    differs = re.search(r"inequivalent arg '([^']+)'.*received (.+) but current is (.+)", broker_text)
    detail, fix = broker_text, "the matching --queue-type"
    if differs:
        argument, ours, theirs = differs[1], argument_value(differs[2]), argument_value(differs[3])
        detail = f"{argument} is {theirs}, not {ours}"
        if argument == "x-queue-type":
            kind = theirs.strip("'") if theirs != "not set" else "classic"
            fix = f"--queue-type {kind}"
            if theirs == "not set":  # the tutorial's classic task_queue, from before it moved to quorum queues
                detail = f"{argument} is not set: a classic queue, as an older tutorial made it; not {ours}"
    if waiting:
        return QueueMismatch(
            f"queue '{queue}' already exists with other arguments ({detail}), made by another version; once "
            f"its tasks have moved on, remove it with: python delete_queue.py {queue} --if-empty"
        )
    return QueueMismatch(
        f"queue '{queue}' already exists with other arguments ({detail}); "
        f"use {fix}, or once it is empty remove it with: python delete_queue.py {queue} --if-empty"
    )


def argument_value(text: str) -> str:
    """A queue argument's value as a 406 names it ("the value 'quorum' of type 'longstr'", "none"): 'quorum'."""
    value = re.fullmatch(r"the value (.+) of type '\w+'", text.strip())
    text = value[1] if value else text.strip()
    return "not set" if text == "none" else text


def mismatch_from(error: BaseException) -> QueueMismatch | None:
    """A QueueMismatch if the broker closed the channel over a redeclaration with other arguments."""
    if isinstance(error, pika.exceptions.ChannelClosedByBroker) and error.reply_code == 406:
        declared = re.search(r"inequivalent arg .* for queue '([^']+)'", error.reply_text)
        if declared:
            return queue_mismatch(declared[1], error.reply_text)
    return None


def access_refused(error: BaseException, url: str | None = None) -> AccessRefused | None:
    """An AccessRefused if the broker closed a channel with 403: the user lacks a permission on the queue."""
    if isinstance(error, pika.exceptions.ChannelClosedByBroker) and error.reply_code == 403:
        on = f" by {where(url)}" if url else ""
        return AccessRefused(
            f"access refused{on}: {error.reply_text}; "
            f"see the user's permissions with: rabbitmqctl list_permissions -p {vhost_of(url) if url else '/'}"
        )
    return None


def is_connection_lost(error: BaseException) -> bool:
    """A lost connection or channel, after which reconnecting may help."""
    if is_login_refused(error) or mismatch_from(error) or access_refused(error):
        return False
    return isinstance(
        error,
        (
            pika.exceptions.AMQPConnectionError,
            pika.exceptions.ChannelClosed,
            pika.exceptions.ChannelWrongStateError,
            pika.exceptions.ConnectionWrongStateError,
        ),
    )


def is_login_refused(error: BaseException) -> bool:
    """Wrong user, password or vhost: retrying cannot help.

    pika's Probable* errors are a guess from the stage at which the connection closed; they are a
    refusal only when the broker said so (403 ACCESS_REFUSED, 530 NOT_ALLOWED, which pika wraps). A
    connection that merely ended there (EOF, reset) is a broker stopping or starting: lost, retried."""
    if isinstance(error, (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError)):
        stated = re.match(r"ConnectionClosedByBroker: \((\d+)\)", str(error))
        return bool(stated) and int(stated.group(1)) in (403, 530)
    return isinstance(error, pika.exceptions.ConnectionClosedByBroker) and error.reply_code in (403, 530)


def describe(error: BaseException) -> str:
    """A short, password-free description of a pika (or socket) error."""
    if isinstance(
        error,
        (
            pika.exceptions.ConnectionClosedByBroker,
            pika.exceptions.ChannelClosedByBroker,
        ),
    ):
        text = f"closed by the broker: {error.reply_code} {error.reply_text}"
    elif getattr(error, "exceptions", None):  # pika's AMQPConnectionWorkflowFailed: why the last try failed
        return describe(error.exceptions[-1])
    elif isinstance(getattr(error, "exception", None), BaseException):  # a connector phase error
        return describe(error.exception)
    elif isinstance(error, pika.exceptions.AMQPConnectionError) and error.args:
        inner = error.args[0]
        text = describe(inner) if isinstance(inner, BaseException) else str(error)
    else:
        text = str(error) or type(error).__name__
    return redact_text(text)


def printable(data: bytes | str, limit: int | None = None) -> str:
    """Text that is safe on a terminal: control characters escaped as repr() does, cut to `limit`.

    Bodies, headers and error texts come from other programs; printed raw, an escape
    sequence in them could clear or retitle the terminal of whoever watches the worker.
    """
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    if limit is not None:
        text = text[: limit * 4]  # escaping only lengthens: no need to look further
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def clock(seconds: float) -> str:
    """A moment (seconds since the epoch) in local time: 18:30:00 today, else 2026-12-24 18:00:00."""
    moment = time.localtime(seconds)
    today = time.localtime()[:3] == moment[:3]
    return time.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M:%S", moment)


def plural(count: int, noun: str) -> str:
    """'1 task', '2 tasks', '1,000 messages'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


# --- URLs and connection parameters -------------------------------------------


# scheme://user:password@... : the password runs to the LAST "@" (a raw "@", "/", "#" or "?" in a
# password is a mistake people make; hiding too much of a URL is better than showing part of one).
USERINFO = r"[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*:"


def redact(url: str) -> str:
    """The URL with its password replaced by ***, safe to print or log."""
    if not password_of(url):
        # No "@": scheme://user:x/... is a host and port, unless x is no port (then: a password cut short).
        return re.sub(rf"^({USERINFO})(?!\d*(/|$))[^/]*", r"\1***", url)
    return re.sub(rf"^({USERINFO}).*@", r"\1***@", url, flags=re.S)


def redact_text(text: str) -> str:
    """Every URL's password in a text replaced by *** (a URL ends at whitespace)."""
    return re.sub(rf"({USERINFO})\S*@", r"\1***@", text)


def password_of(url: str) -> str:
    """The password as written in a URL ('' if none: host:port/vhost@... has an "@" but no password)."""
    found = re.match(rf"{USERINFO}(.*)@", url, flags=re.S)
    if not found or re.match(r"\d*(/|$)", found[1]):  # a port, then the path: no user information at all
        return ""
    return found[1]


def shows_part_of(text: str, secret: str) -> bool:
    """Whether `text` holds the secret, or any four characters of it in a row (decoded or not)."""
    forms = {secret, unquote(secret)} - {""}
    return any(form in text for form in forms) or any(
        form[i : i + 4] in text for form in forms for i in range(len(form) - 3)
    )


def broker_urls(cli_urls: list[str] | None) -> list[str]:
    """--url values, else the comma-separated URLs in AMQP_URL, else the local default."""
    if cli_urls:
        return cli_urls
    return split_urls(os.environ.get("AMQP_URL", ""), "AMQP_URL") or [DEFAULT_URL]


URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # "scheme://": where a URL's parts can be told apart


def split_urls(text: str, where_from: str) -> list[str]:
    """The comma-separated URLs of a cluster; a part that is no URL is refused, and none of it echoed (a
    password with a raw comma in it would be cut in two, and half of it shown)."""
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if len(urls) == 1:
        return urls  # one URL: connection_parameters() checks it, and says what an AMQP URL looks like
    if any(not URL_START.match(url) for url in urls):
        raise UsageError(
            f"{where_from} holds something that is not a URL after a comma (commas separate the URLs of a cluster); "
            "if a password holds a comma, write it as %2C"
        )
    return urls


def connection_parameters(url: str) -> pika.URLParameters:
    """pika parameters for a URL, with certificate verification for amqps://.

    The CA comes from the URL's ssl_options, else from the file named by
    AMQP_CA_FILE, else from the system's trust store.
    """
    parts = urlsplit(url)
    with_slashes = URL_START.match(url)
    if parts.scheme not in ("amqp", "amqps") or not with_slashes:
        # Without "scheme://" redact() cannot tell a password from a host: then the URL is not shown at all.
        shown = f": {redact(url)}" if with_slashes else ""
        raise UsageError(
            f"not an AMQP URL{shown} (expected amqp:// or amqps://, then user, password, host, port, vhost)"
        )
    password = password_of(url)
    if any(c in password for c in "/#?@"):
        raise UsageError(
            f"bad URL {redact(url)}: a '/', '#', '?' or '@' comes before its last '@'; if the password holds "
            "one, percent-encode it: write / as %2F, # as %23, ? as %3F and @ as %40"
        )
    if "@" in parts.path:  # amqp:///user:password@host: no host, and the rest taken for a vhost; not shown
        raise UsageError("bad URL: an '@' after the host (expected amqp://user:password@host:port/vhost)")
    try:
        parameters = pika.URLParameters(url)
    except Exception as error:
        why = redact_text(str(error))  # pika's own text may quote a piece of the URL: never of the password
        raise UsageError(f"bad URL {redact(url)}" + ("" if shows_part_of(why, password) else f": {why}")) from None
    if parts.scheme == "amqps" and "ssl_options" not in parse_qs(parts.query):
        context = ssl.create_default_context(cafile=os.environ.get("AMQP_CA_FILE") or None)
        parameters.ssl_options = pika.SSLOptions(context, server_hostname=parts.hostname)
    if "socket_timeout" not in parse_qs(parts.query):
        parameters.socket_timeout = 5  # fail over quickly from a host that does not answer
    return parameters


def vhost_of(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def where(url: str) -> str:
    """host:port/vhost of a URL, for messages."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)} vhost '{vhost_of(url)}'"


class Backoff:
    """Pauses between attempts: 0.25 s, doubling up to 5 s; reset() once an attempt went well."""

    FIRST, LONGEST = 0.25, 5.0

    def __init__(self) -> None:
        self.pause = self.FIRST

    def next(self) -> float:
        pause, self.pause = self.pause, min(self.pause * 2, self.LONGEST)
        return pause

    def reset(self) -> None:
        self.pause = self.FIRST


def connect(
    urls: list[str],
    retry_for: float | None,
    should_stop: Callable[[], bool] = lambda: False,
    announce: Callable[[str], None] = LOGGER.warning,
) -> tuple[pika.BlockingConnection, str] | None:
    """Open a BlockingConnection to the first URL that answers: (connection, its URL).

    Keeps trying the URLs in turn, with capped exponential backoff, for
    ``retry_for`` seconds (``None``: until ``should_stop()``), then raises
    BrokerUnreachable. A refused login raises LoginRefused at once: no retry.
    Returns None if ``should_stop()`` became true while waiting.
    """
    started = time.monotonic()
    deadline = None if retry_for is None else started + retry_for
    backoff = Backoff()
    announced = False
    while True:
        for url in urls:
            try:
                return pika.BlockingConnection(connection_parameters(url)), url
            except pika.exceptions.AMQPError as error:
                if is_login_refused(error):
                    raise LoginRefused(f"login refused by {where(url)}: wrong user, password or vhost") from None
                reason = f"cannot reach {where(url)}: {describe(error)}"
            except (OSError, ssl.SSLError) as error:  # TLS handshake, DNS
                reason = f"cannot reach {where(url)}: {describe(error)}"
        pause, now = backoff.next(), time.monotonic()
        if deadline is not None and now >= deadline:
            raise BrokerUnreachable(f"{reason} (gave up after trying for {now - started:.1f}s)")
        if deadline is not None:
            pause = min(pause, deadline - now)  # a last try at the deadline, not a pause's length before it
        if not announced and (retry_for is None or retry_for > 5):  # say why we wait, if it may be long
            announce(f"{reason}; retrying" + (f" for up to {retry_for:g}s" if retry_for else ""))
            announced = True
        if not sleep_unless(pause, should_stop):
            return None


def sleep_unless(seconds: float, should_stop: Callable[[], bool]) -> bool:
    """Sleep in short slices; False if should_stop() became true first."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if should_stop():
            return False
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))
    return not should_stop()


# --- The queue ----------------------------------------------------------------


def queue_arguments(queue_type: str) -> dict:
    """Arguments of task_queue, exactly as the official tutorial declares it."""
    return {"x-queue-type": queue_type}


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dlq"


# Headers a broker sets on a message it delivers or dead-letters: not ours to copy onto a new message
# (a retry, a dead letter, a replay). 4.3 adds x-acquired-count; 3.13 and later x-last-death-*.
BROKER_HEADERS = ("x-delivery-count", "x-acquired-count", "x-death")
BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")


def without_broker_headers(headers: dict | None) -> dict:
    return {
        key: value
        for key, value in (headers or {}).items()
        if key not in BROKER_HEADERS and not key.startswith(BROKER_HEADER_PREFIXES)
    }


def broker_version(connection) -> tuple[int, ...]:
    """The broker's version, (4, 3, 6) say, from what it announced when we connected; (0,) if unknown.
    A BlockingConnection or a SelectConnection."""
    impl = getattr(connection, "_impl", connection)  # a BlockingConnection's SelectConnection
    version = impl.server_properties.get("version", b"")  # pika has no public accessor
    text = version.decode(errors="replace") if isinstance(version, bytes) else str(version)
    numbers = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(n) for n in numbers.groups() if n is not None) if numbers else (0,)


def dead_letter_queue_arguments(queue_type: str, version: tuple[int, ...]) -> dict:
    """The dead-letter queue's arguments: on RabbitMQ 4, no delivery limit, so that reading it (a
    return each time) never drops a dead task. 3.10 has no default limit, and takes -1 as 0."""
    arguments = queue_arguments(queue_type)
    if queue_type == "quorum" and version >= (4,):
        arguments["x-delivery-limit"] = -1
    return arguments


@contextlib.contextmanager
def short_channel(connection: pika.BlockingConnection):
    """A channel for one question, closed afterwards unless the broker closed it (a refused declare)."""
    channel = connection.channel()
    try:
        yield channel
    finally:
        if channel.is_open:
            channel.close()


_WARNED_OF_A_LIMIT: set[str] = set()  # dead-letter queues we warned of (only the connection's thread declares)


def declare_dead_letter_queue(connection: pika.BlockingConnection, queue: str, queue_type: str) -> None:
    """Declare <queue>.dlq on a channel of its own (a refused declaration closes its channel).

    A dead-letter queue that an earlier version declared without x-delivery-limit keeps working,
    with a warning: on RabbitMQ 4 it drops a dead task at its 21st return (a list, say)."""
    name = dead_letter_queue(queue)
    arguments = dead_letter_queue_arguments(queue_type, broker_version(connection))
    if not declared_as_we_do(connection, name, arguments):
        with short_channel(connection) as channel:
            channel.queue_declare(queue=name, durable=True, arguments=queue_arguments(queue_type))


def check_dead_letter_limit(connection: pika.BlockingConnection, queue: str) -> None:
    """dead_letters.py: warn if <queue>.dlq, a quorum queue, has RabbitMQ 4's delivery limit."""
    arguments = dead_letter_queue_arguments("quorum", broker_version(connection))
    if "x-delivery-limit" in arguments:
        declared_as_we_do(connection, dead_letter_queue(queue), arguments)


def declared_as_we_do(connection: pika.BlockingConnection, name: str, arguments: dict) -> bool:
    """Declare a dead-letter queue with these arguments; False, and a warning once, if it exists
    without our x-delivery-limit (another difference, such as its type, is left to the caller)."""
    try:
        with short_channel(connection) as channel:
            channel.queue_declare(queue=name, durable=True, arguments=arguments)
        return True
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code != 406:
            raise
        if "'x-delivery-limit'" not in error.reply_text:
            return False  # another difference (a classic dead-letter queue has no limit): the caller's to handle
    if name not in _WARNED_OF_A_LIMIT:
        _WARNED_OF_A_LIMIT.add(name)  # once a process, not at every reconnect
        LOGGER.warning(
            "queue '%s' was declared without x-delivery-limit, so RabbitMQ 4 drops a dead task from it at its "
            "21st return (dead_letters.py list returns each one it shows); unless a policy lifts the limit already, "
            "lift it with: rabbitmqctl set_policy %s-no-limit '^%s$' '{\"delivery-limit\": -1}' --apply-to "
            "quorum_queues (or delete the queue when it is empty)",
            name,
            name,
            re.escape(name),
        )
    return False


def wait_queue(queue: str, delay: float) -> str:
    """Where a failed task of `queue` waits `delay` seconds before its retry: task_queue.retry.10s.
    The name says the queue's TTL exactly (1000001 is not rounded to 1e+06): one name, one TTL."""
    milliseconds = round(delay * 1000)  # the TTL: see wait_queue_arguments
    return f"{queue}.retry.{milliseconds // 1000}{f'.{milliseconds % 1000:03d}'.rstrip('0').rstrip('.')}s"


def wait_queue_arguments(queue: str, queue_type: str, delay: float) -> dict:
    """A wait queue: every message expires after `delay` and the broker dead-letters it back to `queue`.

    One queue per delay, with a queue-wide TTL: per-message TTLs in one queue expire only at its
    head, so a long delay would hold back a short one behind it."""
    arguments = {
        "x-queue-type": queue_type,
        "x-message-ttl": round(delay * 1000),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
    }
    if queue_type == "quorum":  # quorum queues dead-letter at most once unless told otherwise
        arguments.update({"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
    return arguments


DELAY_QUEUE_LINGER = 3600  # seconds a delay queue stays after its last declaration, beyond its delay
MAX_DELAY = 30 * 24 * 3600  # seconds: the broker takes a TTL and an x-expires up to 2^32 - 1 ms (49 days)


def delay_queue(queue: str, seconds: int) -> str:
    """Where a task of `queue` published with new_task.py --delay waits: task_queue.delay.600s."""
    return f"{queue}.delay.{seconds}s"


def delay_queue_arguments(queue: str, seconds: int) -> dict:
    """A delay queue is a wait queue (see wait_queue_arguments) that removes itself DELAY_QUEUE_LINGER
    seconds past its delay after it was last declared (x-expires: each new_task.py declares it, and
    again while it publishes), so that many distinct delays leave no queues behind.

    It is a classic queue, whatever the work queue's type: a quorum queue's x-expires counts from its
    creation, whatever declares it since (rabbitmq-server#5894), and would take waiting tasks with it."""
    return {**wait_queue_arguments(queue, "classic", seconds), "x-expires": (seconds + DELAY_QUEUE_LINGER) * 1000}


# --- Command line and logging ---------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and shows each option's default, where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def number(kind: Callable[[str], float], minimum: float = 0, maximum: float | None = None) -> Callable[[str], float]:
    """An argparse type: a number of `kind` (int or float), at least `minimum` (at most `maximum`), finite."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not minimum <= value < float("inf"):  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be {minimum} or more: {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be {maximum} or less: {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def non_negative(kind: Callable[[str], float]) -> Callable[[str], float]:
    return number(kind, minimum=0)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        action="append",
        metavar="URL",
        # argparse %-formats help texts: the %2F in the URL must be written %%2F.
        help="broker URL; repeat for a cluster (default: $AMQP_URL, comma-separated URLs, "
        f"else {redact(DEFAULT_URL).replace('%', '%%')})",
    )


MAX_QUEUE_NAME = 255 - 32  # bytes: room for the names made from it (.dlq, .retry.2.5s, .delay.2592000s)


def check_queue_name(name: str, what: str = "--queue", derived: bool = True) -> str:
    """A queue name the broker takes, with its derived names (`derived`), or a UsageError that says why."""
    size = len(name.encode("utf-8", "surrogateescape"))
    if not name:
        raise UsageError(f"{what}: a queue name cannot be empty (the broker would make one up: amq.gen-...)")
    if name.startswith("amq."):
        raise UsageError(f"{what} '{printable(name, limit=60)}': names that start with amq. are the broker's own")
    limit = MAX_QUEUE_NAME if derived else 255
    if size > limit:
        room = " (the names made from it, such as <queue>.dlq and <queue>.delay.600s, must fit the broker's 255)"
        raise UsageError(f"{what}: a queue name of at most {limit} bytes{room if derived else ''}; this one has {size}")
    return name


def add_queue_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queue", default=DEFAULT_QUEUE, help="queue name")
    parser.add_argument(
        "--queue-type",
        choices=QUEUE_TYPES,
        default="quorum",
        help="type to declare the queue with; must match an existing queue of that name",
    )


class PrintableFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def setup_logging(label: str = "") -> None:
    """Warnings and errors on stderr, one line each, labelled like the script's output."""
    prefix = f"{label} " if label else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter(f"{prefix}[!] %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # we report connection trouble ourselves


def stdout_is_broken() -> bool:
    """Whether standard output's reader went away; if so, it is pointed at /dev/null, so that Python's own
    flush at exit does not fail again."""
    try:
        descriptor = sys.stdout.fileno()
        poller = select.poll()
        poller.register(descriptor, select.POLLOUT)
        broken = any(events & select.POLLERR for _, events in poller.poll(0))  # a pipe whose reader closed it
    except (OSError, ValueError, AttributeError):
        return False
    if broken:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), descriptor)
    return broken


def run(main: Callable[[], int]) -> None:
    """Run a script's main(): errors become one line on stderr and an exit code."""
    prog = os.path.basename(sys.argv[0])
    try:
        code = main()
    except pika.exceptions.ChannelClosedByBroker as error:
        known = mismatch_from(error) or access_refused(error)
        print(f"{prog}: error: {printable(describe(known or error))}", file=sys.stderr)
        code = known.exit_code if known else EXIT_UNEXPECTED
    except WorkQueueError as error:
        print(f"{prog}: error: {printable(redact_text(str(error)))}", file=sys.stderr)
        code = error.exit_code
    except pika.exceptions.AMQPConnectionError as error:
        if is_login_refused(error):
            print(
                f"{prog}: error: login refused: wrong user, password or vhost",
                file=sys.stderr,
            )
            code = EXIT_LOGIN_REFUSED
        else:
            print(f"{prog}: error: lost the broker: {printable(describe(error))}", file=sys.stderr)
            code = EXIT_UNREACHABLE
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BrokenPipeError as error:  # `... | head`: the reader has what it wanted; say no more, as `cat` would
        if stdout_is_broken():
            code = 128 + signal.SIGPIPE
        else:  # another pipe (a child process's): a fault like any other
            print(f"{prog}: unexpected error: BrokenPipeError: {printable(describe(error))}", file=sys.stderr)
            code = EXIT_UNEXPECTED
    except Exception as error:
        print(
            f"{prog}: unexpected error: {type(error).__name__}: {printable(describe(error))}",
            file=sys.stderr,
        )
        code = EXIT_UNEXPECTED
    sys.exit(code)


# --- For applications: send tasks (workqueue/producer.py) ----------------------------------

if TYPE_CHECKING:  # for readers and type checkers: what __getattr__ below gives
    from workqueue.producer import AsyncProducer, Producer


def __getattr__(name: str):
    """`from workqueue import Producer`: the producer's module is imported on first use, so that worker.py and
    the other scripts, which never send this way, do not pay for it at every start."""
    if name in ("Producer", "AsyncProducer"):
        from workqueue import producer  # noqa: PLC0415 (it builds on everything above)

        globals()[name] = value = getattr(producer, name)  # once: the next lookup finds it here
        return value
    raise AttributeError(f"module 'workqueue' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [  # the library's API; the rest of this module is the scripts' plumbing
    "AccessRefused",
    "AsyncProducer",
    "BrokerUnreachable",
    "LoginRefused",
    "NotConfirmed",
    "Producer",
    "QueueMismatch",
    "UsageError",
    "WorkQueueError",
]
