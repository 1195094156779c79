"""Pure logic, no broker: URL handling, error texts, parsing, scheduling."""

from __future__ import annotations

import concurrent.futures
import inspect
import io
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pika
import pytest

import bench
import exercises
import new_task
import workqueue
from new_task import LineReader
from worker import TaskFailed, dot_task
from workqueue import policy, taskpool
from workqueue.policy import Past, Returns, retries_of, returns_of
from workqueue.producer import END, NACK_RETRIES, Outbox, message, queued
from workqueue.taskpool import Console, Delivery

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:s3cret@host:5672/%2F", "amqp://guest:***@host:5672/%2F"),
        ("amqps://u:p%40ss@h/vh", "amqps://u:***@h/vh"),
        ("amqp://host/%2F", "amqp://host/%2F"),
        ("amqp://user@host/", "amqp://user@host/"),
    ],
)
def test_redact_hides_passwords(url, shown):
    assert workqueue.redact(url) == shown


def test_redact_text_finds_urls_inside_messages():
    assert workqueue.redact_text("bad URL amqp://a:b@c/ here") == "bad URL amqp://a:***@c/ here"


def test_broker_urls_come_from_options_then_environment_then_default(monkeypatch):
    monkeypatch.setenv("AMQP_URL", " amqp://a/ , amqp://b/ ,")
    assert workqueue.broker_urls(["amqp://cli/"]) == ["amqp://cli/"]
    assert workqueue.broker_urls(None) == ["amqp://a/", "amqp://b/"]
    monkeypatch.delenv("AMQP_URL")
    assert workqueue.broker_urls(None) == [workqueue.DEFAULT_URL]


def test_connection_parameters_reject_other_schemes():
    with pytest.raises(workqueue.UsageError, match=r"not an AMQP URL: http://u:\*\*\*@h/"):
        workqueue.connection_parameters("http://u:pw@h/")


def test_amqps_verifies_certificates_by_default():
    parameters = workqueue.connection_parameters("amqps://u:p@broker.example:5671/%2F")
    context = parameters.ssl_options.context
    assert context.check_hostname and context.verify_mode.name == "CERT_REQUIRED"
    assert parameters.ssl_options.server_hostname == "broker.example"


def test_queue_mismatch_says_what_differs_and_how_to_fix_it():
    error = pika.exceptions.ChannelClosedByBroker(
        406,
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'task_queue' in vhost '/': "
        "received 'classic' but current is 'quorum'",
    )
    mismatch = workqueue.mismatch_from(error)
    assert mismatch.exit_code == workqueue.EXIT_QUEUE_MISMATCH
    assert str(mismatch) == (
        "queue 'task_queue' already exists with other arguments (x-queue-type is 'quorum', not 'classic'); "
        "use --queue-type quorum, or once it is empty remove it with: python delete_queue.py task_queue --if-empty"
    )
    assert not workqueue.is_connection_lost(error)


def test_a_classic_queue_of_an_older_tutorial_is_named_with_the_option_that_fits_it():
    # What RabbitMQ 3.10 and 4.x say when the tutorial's old classic task_queue (declared with no arguments)
    # meets a quorum declaration, and the other way round.
    error = pika.exceptions.ChannelClosedByBroker(
        406,
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'task_queue' in vhost '/': "
        "received the value 'quorum' of type 'longstr' but current is none",
    )
    assert str(workqueue.mismatch_from(error)) == (
        "queue 'task_queue' already exists with other arguments (x-queue-type is not set: a classic queue, "
        "as an older tutorial made it; not 'quorum'); use --queue-type classic, or once it is empty remove it "
        "with: python delete_queue.py task_queue --if-empty"
    )
    error = pika.exceptions.ChannelClosedByBroker(
        406,
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': "
        "received the value 'classic' of type 'longstr' but current is the value 'quorum' of type 'longstr'",
    )
    mismatch = str(workqueue.mismatch_from(error))
    assert "(x-queue-type is 'quorum', not 'classic'); use --queue-type quorum, or once" in mismatch


def test_login_errors_are_not_retried_but_lost_connections_are():
    # pika wraps the error in a guess made from the stage the connection closed at, as repr() (connection.py)
    guess = pika.exceptions.ProbableAuthenticationError
    refused = guess(repr(pika.exceptions.ConnectionClosedByBroker(403, "ACCESS_REFUSED - Login was refused")))
    assert workqueue.is_login_refused(refused) and not workqueue.is_connection_lost(refused)
    no_vhost = pika.exceptions.ConnectionClosedByBroker(530, "NOT_ALLOWED - vhost nope not found")
    assert not workqueue.is_connection_lost(pika.exceptions.ProbableAccessDeniedError(repr(no_vhost)))
    # ... and the same guess when a stopping broker hung up during the login, or closed it: lost, and retried
    for lost in (pika.exceptions.StreamLostError("Transport indicated EOF"),
                 pika.exceptions.ConnectionClosedByBroker(320, "CONNECTION_FORCED - shutdown")):  # fmt: skip
        hung_up = guess(repr(lost))
        assert not workqueue.is_login_refused(hung_up) and workqueue.is_connection_lost(hung_up)
    assert workqueue.is_connection_lost(pika.exceptions.ConnectionClosedByBroker(320, "CONNECTION_FORCED"))
    assert workqueue.is_connection_lost(pika.exceptions.StreamLostError("reset"))


def read_all(reader: LineReader) -> list:
    """Everything a LineReader queued, up to and with END (each get waits at most 5 s)."""
    items = [reader.lines.get(timeout=5)]
    while items[-1] is not END:
        items.append(reader.lines.get(timeout=5))
    return items


def test_line_reader_skips_blank_lines_and_line_endings_and_keeps_a_last_line_without_one():
    reader = LineReader(io.BytesIO(b"a\r\n\nb\n\xff\n\r\nlast"))
    reader.start(wake=lambda: None)
    batches = read_all(reader)
    assert [line for batch in batches[:-1] for line in batch] == [b"a", b"b", b"\xff", b"last"]


def test_line_reader_hands_over_a_line_at_once_and_wakes_the_publisher():
    read_end, write_end = os.pipe()
    woken = []
    with open(read_end, "rb", buffering=0) as stream, open(write_end, "wb", buffering=0) as pipe:
        reader = LineReader(stream)
        reader.start(wake=lambda: woken.append(True))
        pipe.write(b"first\nsecond")  # the second line is not complete yet
        assert reader.lines.get(timeout=5) == [b"first"]  # while the pipe stays open
        assert woken == [True]
        pipe.write(b" half\n")
        assert reader.lines.get(timeout=5) == [b"second half"]
    assert reader.lines.get(timeout=5) is END


def test_dot_task_fails_on_the_word_error_only():
    task = dot_task(0)
    task(b"fine...")
    task(b"errors are not the word")
    with pytest.raises(TaskFailed):
        task(b"an Error.")


def test_ideal_makespan_is_the_greedy_schedule():
    # Workers free at 0,0: tasks 4,1,1,1 -> w1: 4; w2: 1,1,1 -> 3. Makespan 4.
    assert bench.ideal_makespan([4, 1, 1, 1], workers=2, dot_seconds=1) == 4
    assert bench.ideal_makespan([1, 1, 1, 1], workers=2, dot_seconds=0.5) == 1


def find_python(version: str) -> str | None:
    """pythonX.Y on PATH, or one that pyenv installed (its shims answer only for the active version)."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [
        shutil.which(f"python{version}"),
        *sorted(pyenv_root.glob(f"versions/{version}.*/bin/python{version}")),
    ]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "--version"], capture_output=True, check=False).returncode == 0:
            return str(candidate)
    return None


@pytest.mark.parametrize("source", ["directory", "git URL"])
def test_pip_install_gives_the_library_and_the_scripts_as_commands(source, tmp_path):
    """`pip install .` (or from a git URL) in a fresh virtual environment, used outside the repository:
    `from workqueue import Producer, AsyncProducer`, and the four scripts as commands. pika comes from this
    environment (PYTHONPATH); pip fetches setuptools to build it, as it would for a user."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    if source == "git URL":  # what is committed: a clone of this checkout's HEAD
        if not (ROOT / ".git").exists():
            pytest.fail("not a git checkout: the git URL form cannot be tried")
        target = f"git+file://{ROOT}"
    else:  # a copy: pip builds a directory in place (build/, *.egg-info), which would litter this checkout
        target = str(tmp_path / "src")
        litter = shutil.ignore_patterns(".venv", ".git", ".test-logs", "build", "*.egg-info", "__pycache__")
        shutil.copytree(ROOT, target, ignore=litter)
    installed = subprocess.run(
        [venv / "bin/python", "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", target],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    pika_dir = str(Path(pika.__file__).parent.parent)
    outside = {**os.environ, "PYTHONPATH": pika_dir}
    code = "import workqueue\nfrom workqueue import AsyncProducer, Producer\nprint(workqueue.__file__)"
    library = subprocess.run(
        [venv / "bin/python", "-c", code],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path, env=outside,
    )  # fmt: skip
    assert library.returncode == 0, library.stderr
    assert library.stdout.startswith(str(venv)), library.stdout  # the installed copy, not this checkout
    for command in ("new_task.py", "worker.py", "delete_queue.py", "dead_letters.py"):
        shown = subprocess.run(
            [venv / "bin" / command, "--help"], capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
            env=outside,
        )  # fmt: skip
        assert shown.returncode == 0 and "usage:" in shown.stdout, (command, shown.stderr)


@pytest.mark.parametrize("version", ["3.9", "3.10", "3.11", "3.12", "3.13"])
def test_the_scripts_import_on_every_python_that_pyproject_claims(version):
    """requires-python says 3.9 and later: import every script on each of those Pythons found here."""
    python = find_python(version)
    if python is None:
        pytest.skip(f"python{version} is not installed here")
    pika_dir = str(Path(pika.__file__).parent.parent)  # pika is pure Python: one copy serves every version
    result = subprocess.run(
        [python, "-c", "import workqueue, workqueue.policy, worker, new_task, delete_queue, local_broker, exercises"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{pika_dir}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r'requires-python = ">=3\.9"', (ROOT / "pyproject.toml").read_text())


# --- The publisher's Outbox (new_task.py, Producer): window, confirms, nacks and resends, without a broker ----


def take(outbox: Outbox) -> bytes | None:
    """Publish the next message if the window lets us: its body, or None."""
    if outbox.peek() is None:
        return None
    return outbox.take().body


def test_outbox_keeps_at_most_a_window_unconfirmed_and_frees_a_slot_per_confirm():
    outbox = Outbox(queued([b"a", b"b", b"c"]), window=2)
    assert [take(outbox), take(outbox), take(outbox)] == [b"a", b"b", None]  # window full
    outbox.settle(1, multiple=False, ack=True)
    assert take(outbox) == b"c"
    assert take(outbox) is None and not outbox.finished  # b and c still wait for their confirms
    outbox.settle(3, multiple=True, ack=True)
    assert take(outbox) is None  # the source is found empty only when asked
    assert outbox.finished and outbox.confirmed == 3 and outbox.published == 3


def test_outbox_sends_the_unconfirmed_again_first_after_a_drop_with_tags_from_1():
    outbox = Outbox(queued([b"a", b"b"], [b"c", b"d"]), window=10)
    taken = [take(outbox) for _ in range(3)]
    outbox.settle(1, multiple=False, ack=True)
    assert outbox.connection_lost() == 2
    assert [take(outbox), take(outbox), take(outbox)] == [b"b", b"c", b"d"]  # in order, resends first
    assert list(outbox.unconfirmed) == [1, 2, 3]  # the new channel's tags
    assert outbox.resent == 2 and taken == [b"a", b"b", b"c"]


def test_outbox_resends_a_nacked_message_until_it_gives_up_and_its_sender_hears_why():
    future = concurrent.futures.Future()
    outbox = Outbox(queued([message(b"x", future=future)]), window=10)
    for attempt in range(NACK_RETRIES):
        assert take(outbox) == b"x"
        assert outbox.settle(outbox.last_tag, multiple=False, ack=False) == 1, attempt
    assert take(outbox) == b"x"
    assert outbox.settle(outbox.last_tag, multiple=False, ack=False) == 0  # refused every time: failed
    assert take(outbox) is None
    assert outbox.finished and outbox.nacked == 1 and outbox.confirmed == 0
    with pytest.raises(workqueue.NotConfirmed, match="refused it"):
        future.result(0)


def test_outbox_waits_for_lines_not_read_yet_and_ends_only_at_end():
    lines = queue.Queue()
    outbox = Outbox(lines, window=10)
    assert take(outbox) is None and not outbox.finished  # nothing read yet
    lines.put([b"a"])
    assert take(outbox) == b"a"
    outbox.settle(1, multiple=False, ack=True)
    assert take(outbox) is None and not outbox.finished  # all confirmed, but the input goes on
    lines.put(END)
    assert take(outbox) is None and outbox.finished


def test_outbox_ignores_a_confirm_for_an_unknown_tag():
    outbox = Outbox(queued([b"a"]), window=10)
    take(outbox)
    outbox.settle(99, multiple=False, ack=True)
    assert outbox.confirmed == 0 and list(outbox.unconfirmed) == [1]


def test_every_task_gets_an_id_of_its_own_and_its_sender_gets_it_at_the_confirm():
    futures = [concurrent.futures.Future() for _ in range(3)]
    outbox = Outbox(queued([message(b"same", future=future) for future in futures]), window=10)
    ids = [outbox.peek() and outbox.take().task_id for _ in futures]
    assert len(set(ids)) == 3 and all(len(task_id) == 36 for task_id in ids)  # UUIDs
    assert not any(future.done() for future in futures)  # not before the broker confirms
    outbox.settle(3, multiple=True, ack=True)
    assert [future.result(0) for future in futures] == ids


def test_identical_lines_sent_in_the_same_second_are_different_tasks_to_the_worker():
    """The worker keys what it remembers of a task (how often a consumer timeout took it back) on
    message_identity(); without ids, two identical lines sent in the same second shared one."""
    first, second = message(b"same line."), message(b"same line.")
    second.properties.timestamp = first.properties.timestamp  # the same second
    assert taskpool.message_identity(first.properties, first.body) != taskpool.message_identity(
        second.properties, second.body
    )


def test_a_task_whose_sender_gave_up_before_it_was_published_is_never_published():
    gave_up, waits = concurrent.futures.Future(), concurrent.futures.Future()
    outbox = Outbox(queued([message(b"late", future=gave_up), message(b"on time", future=waits)]), window=10)
    assert gave_up.cancel()
    assert take(outbox) == b"on time" and take(outbox) is None
    assert outbox.withdrawn == 1 and not waits.cancel()  # published: too late to withdraw


def test_an_unroutable_task_fails_at_its_ack():
    future = concurrent.futures.Future()
    outbox = Outbox(queued([message(b"x", future=future)]), window=10)
    outbox.peek()
    outbox.mark_returned(outbox.take().task_id)
    outbox.settle(1, multiple=False, ack=True)
    assert outbox.returned == 1 and outbox.confirmed == 0
    with pytest.raises(workqueue.NotConfirmed, match="unroutable"):
        future.result(0)


def test_a_fatal_error_fails_every_task_waiting_at_once():
    futures = [concurrent.futures.Future() for _ in range(3)]
    source = queue.Queue()
    source.put([message(b"x", future=future) for future in futures])
    outbox = Outbox(source, window=1)
    take(outbox)  # one in flight, two waiting
    assert outbox.fail_waiting(workqueue.LoginRefused("login refused")) == 3
    for future in futures:
        with pytest.raises(workqueue.LoginRefused):
            future.result(0)


def test_a_delay_and_a_priority_are_checked_before_anything_is_sent():
    from workqueue.producer import delay_seconds, priority_level  # noqa: PLC0415

    assert delay_seconds(None) == 0 and delay_seconds(1.2) == 2 and delay_seconds(timedelta(minutes=1)) == 60
    for bad in (-1, float("nan"), float("inf"), "10", True, workqueue.MAX_DELAY + 1):
        with pytest.raises(ValueError, match="delay"):
            delay_seconds(bad)
    assert priority_level("high") == 9 and priority_level("normal") is None and priority_level(7) == 7
    for bad in ("urgent", 256, -1, 1.5):
        with pytest.raises(ValueError, match="priority"):
            priority_level(bad)


def test_printable_escapes_control_characters_and_cuts():
    assert workqueue.printable(b"\x1b[2J\x07ok\xff") == "\\x1b[2J\\x07ok\ufffd"
    assert workqueue.printable("caf\u00e9 \u2028") == "caf\u00e9 \\u2028"
    assert workqueue.printable("x" * 60, limit=50) == "x" * 49 + "…"


def test_retries_of_trusts_only_a_count():
    assert retries_of(pika.BasicProperties(headers={"x-retries": 2})) == (2, None)
    assert retries_of(pika.BasicProperties()) == (0, None)
    for bad in ("2", -1, True, [1], None):
        retries, complaint = retries_of(pika.BasicProperties(headers={"x-retries": bad}))
        assert retries == 0 and "not a count of retries" in complaint


def test_backoff_doubles_to_five_seconds_and_resets():
    backoff = workqueue.Backoff()
    assert [backoff.next() for _ in range(7)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    backoff.reset()
    assert backoff.next() == 0.25


def test_the_documents_python_examples_pass_the_projects_lint(tmp_path):
    """A user saves the README's mytasks.py (or docs/production.md's app.py) in the repository: `./run.sh lint`
    must still pass."""
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    examples = [code for doc in documents for code in re.findall(r"```python\n(.*?)```", doc.read_text(), re.DOTALL)]
    assert len(examples) >= 3
    for number, code in enumerate(examples):
        (tmp_path / f"example{number}.py").write_text(code)
    config = str(ROOT / "pyproject.toml")
    for check in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *check, "--config", config, str(tmp_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("headers", "returns"),
    [
        (None, Returns(0, 0)),  # a classic queue, or a first delivery on RabbitMQ 4
        ({"x-delivery-count": 0}, Returns(0, 0)),  # a first delivery on 3.10
        ({"x-delivery-count": 3}, Returns(3, 3)),  # 3.10 and 4.0: every return counts
        ({"x-delivery-count": 1, "x-acquired-count": 4}, Returns(1, 4)),  # 4.3: nacks are not counted
        ({"x-acquired-count": 2}, Returns(0, 2)),  # 4.3: two nacks, nothing counted toward the limit
        ({"x-delivery-count": "7", "x-acquired-count": -1}, Returns(0, 0)),  # from another program: ignored
    ],
)
def test_returns_read_each_release_s_headers(headers, returns):
    assert returns_of(pika.BasicProperties(headers=headers)) == returns


def test_broker_headers_are_left_out_and_ours_kept():
    headers = {
        "x-retries": 2,
        "x-error": "boom",
        "x-delivery-count": 3,
        "x-acquired-count": 5,
        "x-death": [{"count": 1}],
        "x-first-death-queue": "q.retry.1s",
        "x-last-death-reason": "expired",
        "trace-id": "abc",
    }
    assert workqueue.without_broker_headers(headers) == {"x-retries": 2, "x-error": "boom", "trace-id": "abc"}


@pytest.mark.parametrize(
    ("queue_type", "version", "limit"),
    [("quorum", (3, 10, 8), None), ("quorum", (4, 0, 5), -1), ("quorum", (4, 3, 6), -1), ("classic", (4, 3), None)],
)
def test_the_dead_letter_queue_has_no_delivery_limit_on_rabbitmq_4(queue_type, version, limit):
    arguments = workqueue.dead_letter_queue_arguments(queue_type, version)
    assert arguments.get("x-delivery-limit") == limit and arguments["x-queue-type"] == queue_type


PASSWORDS = ["Kx7/Qw2", "Kx7#Qw2", "Kx7?Qw2", "Kx7@Qw2", "Kx7:Qw2", "Kx7%40Qw2", "Kx7%2FQw2#Zr5"]


def pieces(password: str) -> list[str]:
    """The recognisable parts of a password: what must appear nowhere."""
    return [part for part in re.split(r"%[0-9A-F]{2}|[/#?@: ]", password) if part]


@pytest.mark.parametrize("password", PASSWORDS)
def test_no_form_of_a_password_is_shown(password):
    """`/ # ? @ :` and percent-escapes in a password: neither redact() nor an error shows any of it."""
    url = f"amqp://app:{password}@rabbit1:5672/vh"
    shown = [
        workqueue.redact(url),
        workqueue.redact_text(f"cannot reach {url} today"),
        workqueue.redact(url.replace(password, password.replace("/", " "))),  # a space, even
    ]
    assert shown[:2] == ["amqp://app:***@rabbit1:5672/vh", "cannot reach amqp://app:***@rabbit1:5672/vh today"]
    for bad in (url, f"amqp://app:{password}@rabbit1:99x/vh"):  # the second: pika's error quotes the port
        try:
            workqueue.connection_parameters(bad)
        except workqueue.UsageError as error:
            shown.append(str(error))
    for text in shown:
        assert not any(piece in text for piece in pieces(password)), text


def test_a_password_that_needs_escaping_is_refused_with_how():
    with pytest.raises(workqueue.UsageError, match=r"write / as %2F, # as %23, \? as %3F and @ as %40"):
        workqueue.connection_parameters("amqp://app:pa/ss@rabbit1/vh")
    assert workqueue.connection_parameters("amqp://app:pa%2Fss@rabbit1/vh").credentials.password == "pa/ss"


def test_wait_queue_names_say_their_ttl_exactly():
    """Two delays, two queues: rounding to six digits once named 1000000 s and 1000001 s alike."""
    names = [workqueue.wait_queue("q", delay) for delay in (1, 10, 0.5, 2.25, 1_000_000, 1_000_001)]
    assert names == [
        "q.retry.1s",
        "q.retry.10s",
        "q.retry.0.5s",
        "q.retry.2.25s",
        "q.retry.1000000s",
        "q.retry.1000001s",
    ]
    # The name is the TTL the queue is declared with, to the millisecond.
    assert workqueue.wait_queue("q", 0.0015) == "q.retry.0.002s"
    assert workqueue.wait_queue_arguments("q", "quorum", 0.0015)["x-message-ttl"] == 2


def test_a_comma_in_a_password_in_amqp_url_shows_none_of_it(monkeypatch):
    """AMQP_URL separates a cluster's URLs with commas: a password's comma cuts it in two pieces."""
    monkeypatch.setenv("AMQP_URL", "amqp://guest:Secr3t,xyz9@127.0.0.1:5672/%2F")
    with pytest.raises(workqueue.UsageError, match="write it as %2C") as refused:
        workqueue.broker_urls(None)
    assert "Secr3t" not in str(refused.value) and "xyz9" not in str(refused.value)
    assert workqueue.redact("amqp://guest:Secr3t") == "amqp://guest:***"  # the first piece, on its own
    assert workqueue.redact("amqp://rabbit1:5672/%2F") == "amqp://rabbit1:5672/%2F"  # a port stays
    monkeypatch.setenv("AMQP_URL", "amqp://a:p@h1/%2F, amqp://a:p@h2/%2F")
    assert workqueue.broker_urls(None) == ["amqp://a:p@h1/%2F", "amqp://a:p@h2/%2F"]


@pytest.mark.parametrize(
    ("returned", "taken_back", "max_retries", "unrun"),
    [
        (0, 0, 3, None),  # a first delivery runs (3.10's x-delivery-count 0, or none on 4.x)
        (4, 0, 0, None),  # returns are not failures: --max-retries does not bound them
        (19, 0, 3, None),  # RabbitMQ 4's limit is 20 returns: the 20th delivery still runs...
        (20, 0, 3, "it came back 20 times without an ack"),  # ...the 21st never: the broker would drop it
        (0, 1, 1, None),  # taken back once by a consumer timeout: tried again
        (0, 2, 1, "the broker's consumer timeout took it back 2 times"),  # 4.3 counts none of these
        (5, 2, 1, "the broker's consumer timeout took it back 2 times"),  # the timeout is the truer reason
    ],
)
def test_the_crash_loop_guards(returned, taken_back, max_retries, unrun):
    decision = policy.unrun_because(returned, taken_back, max_retries)
    if unrun is None:
        assert decision is None
    else:
        why, unfinished = decision
        assert why.startswith(unrun)
        assert unfinished == (taken_back if "consumer timeout" in unrun else returned)  # the runs that ended so


@pytest.mark.parametrize(
    ("retries", "max_retries", "final", "after"),
    [
        (0, 3, False, policy.AfterFailure(1, 1.0)),  # the first failure: retry 1 after the first delay
        (1, 3, False, policy.AfterFailure(2, 10.0)),
        (2, 3, False, policy.AfterFailure(3, 60.0)),
        (3, 3, False, policy.AfterFailure(None)),  # the last: the dead-letter queue
        (5, 3, False, policy.AfterFailure(None)),  # past a lowered --max-retries: ran once more, then dead
        (0, 0, False, policy.AfterFailure(None)),  # --max-retries 0
        (0, 3, True, policy.AfterFailure(None)),  # a guard's decision: no retry
        (7, 9, False, policy.AfterFailure(8, 60.0)),  # the last delay repeats
    ],
)
def test_after_a_failure(retries, max_retries, final, after):
    assert policy.after_failure(retries, max_retries, [1.0, 10.0, 60.0], final) == after


def test_wait_queues_are_declared_for_the_delays_that_can_be_reached():
    assert policy.wait_delays([1.0, 10.0, 60.0], 3) == [1.0, 10.0, 60.0]
    assert policy.wait_delays([1.0, 10.0, 60.0], 1) == [1.0]
    assert policy.wait_delays([0.0, 5.0], 4) == [5.0]  # 0 = at once: no wait queue


# The decision for each delivery (policy.decide), with the headers each RabbitMQ release writes (docs/reliability.md's
# "RabbitMQ versions" table): (release, headers, outcome, the worker's state, options, what it does).
FIRST = {"3.10": {"x-delivery-count": 0}, "4.0": None, "4.3": None}  # a first delivery
D, F, NS, C = policy.Outcome.DONE, policy.Outcome.FAILED, policy.Outcome.NOT_STARTED, policy.Outcome.CRASHED
CR = policy.Outcome.CANNOT_RUN
ARRIVED = None
DEFAULT = policy.Options(max_retries=3, retry_delays=(1.0, 10.0, 60.0))
DECISIONS = [
    # A delivery arrives: it runs, unless a crash-loop guard or a shutdown says otherwise.
    *[(r, FIRST[r], ARRIVED, {}, DEFAULT, (policy.Act.RUN,)) for r in FIRST],
    *[(r, FIRST[r], ARRIVED, {"stopping": True}, DEFAULT, (policy.Act.HAND_BACK,)) for r in FIRST],
    # It came back unacked (a worker died with it, lost its connection, or gave it back unstarted): whose
    # fault, no header tells, so it runs in a child process of its own, where a death is its own. Returns
    # do not count as failures on any release, whatever each counts (nacks: 3.10 and 4.0; rejects: all).
    *[
        (r, h, ARRIVED, {}, policy.Options(max_retries=0), (policy.Act.RUN_IN_CHILD,))
        for r, h in [
            ("3.10", {"x-delivery-count": 4}),
            ("4.0", {"x-delivery-count": 4}),
            ("4.3", {"x-delivery-count": 0, "x-acquired-count": 4}),  # nacked 4 times
            ("4.3", {"x-crashes": 1}),  # a retry of a task that killed its child: its next run in one too
        ]
    ],
    ("3.10", {"x-delivery-count": 0}, ARRIVED, {"redelivered": True}, DEFAULT, (policy.Act.RUN_IN_CHILD,)),  # classic
    # Workers died with it 19 times: a last run. 20: RabbitMQ 4 would drop it at the next return; dead-lettered.
    ("4.0", {"x-delivery-count": 19}, ARRIVED, {}, DEFAULT, (policy.Act.RUN_IN_CHILD,)),
    *[
        (r, h, ARRIVED, {}, DEFAULT, (policy.Act.DEAD_LETTER, 0, 0.0, "it came back 20 times without an ack", 20))
        for r, h in [("3.10", {"x-delivery-count": 20}), ("4.3", {"x-delivery-count": 20, "x-acquired-count": 22})]
    ],
    # A consumer timeout took it back twice (--max-retries 1): 4.3 counts none of it, the worker does.
    ("4.3", {"x-acquired-count": 1}, ARRIVED, {"timed_out": 1}, policy.Options(max_retries=1),
     (policy.Act.RUN_IN_CHILD,)),
    ("4.3", {"x-acquired-count": 2}, ARRIVED, {"timed_out": 2}, policy.Options(max_retries=1),
     (policy.Act.DEAD_LETTER, 0, 0.0, "the broker's consumer timeout took it back 2 times", 2)),
    ("3.10", {"x-delivery-count": 2}, ARRIVED, {"timed_out": 2}, policy.Options(max_retries=1),
     (policy.Act.DEAD_LETTER, 0, 0.0, "the broker's consumer timeout took it back 2 times", 2)),
    # The run ended: done is acked; a failure waits for its retry, then goes to the dead-letter queue.
    *[(r, FIRST[r], D, {}, DEFAULT, (policy.Act.ACK,)) for r in FIRST],
    *[(r, FIRST[r], F, {"why": "boom"}, DEFAULT, (policy.Act.RETRY, 1, 1.0)) for r in FIRST],
    ("4.3", {"x-retries": 1, "x-acquired-count": 1}, F, {"why": "boom"}, DEFAULT, (policy.Act.RETRY, 2, 10.0)),
    ("4.3", {"x-retries": 2}, F, {"why": "boom"}, DEFAULT, (policy.Act.RETRY, 3, 60.0)),
    ("4.3", {"x-retries": 3}, F, {"why": "boom"}, DEFAULT, (policy.Act.DEAD_LETTER, 3, 0.0, "boom", 0)),
    ("4.3", {"x-retries": 7}, F, {"why": "boom"}, policy.Options(max_retries=9), (policy.Act.RETRY, 8, 60.0)),
    ("3.10", {"x-retries": 0}, F, {"why": "boom"}, policy.Options(retry_delays=(0.0,)), (policy.Act.RETRY, 1, 0.0)),
    ("3.10", {"x-retries": "oops"}, F, {"why": "boom"}, DEFAULT, (policy.Act.RETRY, 1, 1.0)),  # not a count: 0
    ("4.3", None, F, {"why": "boom"}, policy.Options(max_retries=0), (policy.Act.DEAD_LETTER, 0, 0.0, "boom")),
    # It killed the child process running it: a failure, and its next run is in a child too (x-crashes).
    ("4.3", None, C, {"why": "killed by signal 9"}, DEFAULT, (policy.Act.RETRY, 1, 1.0), 1),
    ("4.3", {"x-retries": 3, "x-crashes": 2}, C, {"why": "killed"}, DEFAULT, (policy.Act.DEAD_LETTER, 3, 0.0), 3),
    ("4.3", {"x-retries": 1, "x-crashes": 1}, F, {"why": "boom"}, DEFAULT, (policy.Act.RETRY, 2, 10.0), 1),
    # Its retry or dead letter could not be published: held and tried again; at a shutdown, back (reject).
    ("4.3", None, F, {"unrecorded": True}, DEFAULT, (policy.Act.HOLD,)),
    ("4.3", None, F, {"unrecorded": True, "stopping": True}, DEFAULT, (policy.Act.REJECT,)),
    ("4.3", None, F, {"unrecorded": True, "channel_open": False}, DEFAULT, (policy.Act.DROPPED,)),  # broker has it
    # A warm shutdown came before a thread took it: back, untouched (a nack), unless its channel is gone.
    ("4.3", None, NS, {"stopping": True}, DEFAULT, (policy.Act.HAND_BACK,)),
    ("4.3", None, NS, {"stopping": True, "channel_open": False}, DEFAULT, (policy.Act.DROPPED,)),
    # No child process could start for it: the worker's fault, never the task's, even at its last retry.
    ("4.3", {"x-retries": 3}, CR, {}, DEFAULT, (policy.Act.HAND_BACK,)),
    ("4.3", None, CR, {"channel_open": False}, DEFAULT, (policy.Act.DROPPED,)),
    ("4.3", None, CR, {"taken_back": True}, DEFAULT, (policy.Act.LOST, 0, 0.0, "the broker's consumer timeout")),
    # Nothing can be acked: its channel is gone, or a consumer timeout took it back; the broker redelivers it.
    ("4.3", None, D, {"channel_open": False}, DEFAULT, (policy.Act.LOST,)),
    ("4.3", None, F, {"channel_open": False, "why": "boom"}, DEFAULT, (policy.Act.LOST,)),
    ("4.3", None, D, {"taken_back": True}, DEFAULT, (policy.Act.LOST, 0, 0.0, "the broker's consumer timeout")),
    # --auto-ack: the broker forgot it when it delivered it; it runs even at a shutdown, and nothing is sent.
    ("4.3", None, ARRIVED, {"stopping": True}, policy.Options(auto_ack=True), (policy.Act.RUN,)),
    ("4.3", {"x-delivery-count": 9}, ARRIVED, {}, policy.Options(auto_ack=True), (policy.Act.RUN,)),
    ("4.3", None, F, {"why": "boom"}, policy.Options(auto_ack=True), (policy.Act.FORGOTTEN,)),
    ("4.3", None, CR, {}, policy.Options(auto_ack=True), (policy.Act.FORGOTTEN,)),  # no tag to hand back
]  # fmt: skip


def test_the_record_of_a_failure_says_where_it_goes_and_keeps_the_tasks_own_headers():
    now = 1_800_000_000.0
    own = {"x-tenant": "a", "x-retries": 0}
    retry = policy.failure_record(
        policy.Decision(policy.Act.RETRY, 1, 10.0), own, "q", max_retries=3, why="boom", now=now
    )
    assert retry.queue == "q.retry.10s" and retry.what.startswith("retry 1 of 3 in 10s (at ")
    assert retry.headers == {"x-tenant": "a", "x-retries": 1, "x-due-at": 1_800_000_010_000}
    at_once = policy.failure_record(policy.Decision(policy.Act.RETRY, 2, 0.0, crashes=1), own, "q", max_retries=3,
                                    why="boom", now=now)  # fmt: skip
    assert (at_once.queue, at_once.what, at_once.headers["x-crashes"]) == ("q", "retry 2 of 3 now", 1)
    dead = policy.failure_record(
        policy.Decision(policy.Act.DEAD_LETTER, 3, unfinished=2), own, "q", max_retries=3, why="x" * 300, now=now
    )
    assert (dead.queue, dead.what) == ("q.dlq", "moved to q.dlq")
    assert dead.headers["x-error"] == "x" * 200 and dead.headers["x-original-queue"] == "q"
    assert dead.headers["x-failed-at"] == "2027-01-15T08:00:00+00:00"
    assert (dead.headers["x-retries"], dead.headers["x-unfinished-runs"], dead.headers["x-tenant"]) == (3, 2, "a")
    assert own == {"x-tenant": "a", "x-retries": 0}  # the task's own headers are not changed


@pytest.mark.parametrize(
    ("release", "headers", "outcome", "state", "options", "expected", "crashes"),
    [row if len(row) == 7 else (*row, 0) for row in DECISIONS],  # crashes: the x-crashes a retry or dead letter carries
)
def test_what_becomes_of_a_delivery(release, headers, outcome, state, options, expected, crashes):
    state = dict(state)
    past, _ = policy.past_of(
        pika.BasicProperties(headers=headers), state.pop("timed_out", 0), state.pop("redelivered", False)
    )
    decision = policy.decide(outcome, past, options, **state)
    assert decision.crashes == crashes
    act, retry, delay, why, unfinished = (*expected, *(0, 0.0, None, None)[len(expected) - 1 :])
    assert decision.act is act
    if len(expected) > 1:
        assert (decision.retry, decision.delay) == (retry, delay)
    if why is not None:
        assert decision.why.startswith(why)
    if unfinished is not None:
        assert decision.unfinished == unfinished


def test_the_one_private_pika_call_is_still_there():
    """workqueue.producer.abandon() drops a connection whose close is never answered with pika's private
    _terminate_stream (pika 1.4 has no public call): a pika release without it fails here, loudly."""
    terminate = getattr(pika.SelectConnection, "_terminate_stream", None)
    assert callable(terminate), pika.__version__
    assert list(inspect.signature(terminate).parameters) == ["self", "error"], pika.__version__


def test_a_task_module_named_like_one_of_the_workers_own_is_refused_with_why():
    """import_module would return the worker's own workqueue package, not the user's workqueue.py: say so."""
    with pytest.raises(workqueue.UsageError, match="workqueue is a module of this worker"):
        taskpool.load_task("workqueue:connect")


@pytest.fixture
def local_time(monkeypatch):
    """Set the local time zone (TZ) for a test."""

    def set_zone(zone: str) -> None:
        monkeypatch.setenv("TZ", zone)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


def test_at_means_the_next_such_time_or_a_date_not_past(local_time):
    local_time("UTC")
    now = datetime(2026, 11, 30, 22, 0, 0, tzinfo=timezone.utc)
    assert new_task.seconds_until("22:10", now) == 600
    assert new_task.seconds_until("21:59:30", now) == 24 * 3600 - 30  # passed today: tomorrow's
    assert new_task.seconds_until("2026-11-30T23:00:00+00:00", now) == 3600
    with pytest.raises(workqueue.UsageError, match="that time has passed"):
        new_task.seconds_until("2026-11-30T21:00:00+00:00", now)
    for bad in ("24:00", "soon", "7pm"):
        with pytest.raises(workqueue.UsageError, match="--at"):
            new_task.seconds_until(bad, now)


def test_at_counts_the_hour_a_daylight_saving_change_adds_or_takes(local_time):
    local_time("Europe/Paris")  # clocks go forward on 29 March 2026 at 02:00, back on 25 October at 03:00
    spring = datetime(2026, 3, 29, 1, 0).astimezone()  # 01:00 CET
    assert new_task.seconds_until("09:00", spring) == 7 * 3600  # 09:00 CEST: one hour less on the wall clock
    autumn = datetime(2026, 10, 24, 22, 0).astimezone()  # 22:00 CEST
    assert new_task.seconds_until("21:00", autumn) == 24 * 3600  # tomorrow's 21:00 CET: 23 wall hours + 1
    assert new_task.seconds_until("02:30", spring) > 0  # a time the clock skips: the next day's, never past


def test_a_delay_queue_is_a_wait_queue_that_goes_away_an_hour_after_its_last_use():
    arguments = workqueue.delay_queue_arguments("task_queue", 600)
    assert arguments["x-message-ttl"] == 600_000 and arguments["x-dead-letter-routing-key"] == "task_queue"
    assert arguments["x-queue-type"] == "classic"  # a quorum queue's x-expires is not renewed by a declaration
    assert arguments["x-expires"] == (600 + 3600) * 1000
    assert workqueue.delay_queue("task_queue", 600) == "task_queue.delay.600s"
    assert workqueue.producer.RENEW_DELAY_QUEUE < workqueue.DELAY_QUEUE_LINGER  # renewed long before it could expire


def test_the_due_time_and_the_wait_since_come_from_headers_and_the_timestamp():
    due = pika.BasicProperties(headers={"x-due-at": 1_700_000_000_500}, timestamp=1_699_999_000)
    assert policy.due_of(due) == (1_700_000_000.5, None)
    assert policy.queued_since(due, 1_700_000_000.5) == 1_700_000_000.5  # a delayed task: from its due time
    plain = pika.BasicProperties(timestamp=1_699_999_000)
    assert policy.queued_since(plain, None) == 1_699_999_000  # else from its publish
    assert policy.queued_since(pika.BasicProperties(), None) is None  # the tutorial's new_task sets neither
    assert policy.due_of(pika.BasicProperties(headers={"x-due-at": "soon"}))[1].startswith("ignoring header x-due-at")
    assert policy.is_high_priority(pika.BasicProperties(priority=9))
    assert not policy.is_high_priority(pika.BasicProperties(priority=4))


def test_run_sh_names_every_entry_point_and_refuses_a_release_it_does_not_know():
    shown = subprocess.run(["bash", str(ROOT / "run.sh")], capture_output=True, text=True, timeout=120, check=False)
    assert shown.returncode == 2
    for entry in ("demo", "test", "lint", "bench", "chaos", "broker"):
        assert f"./run.sh {entry} " in shown.stdout, entry
    refused = subprocess.run(
        ["bash", str(ROOT / "run.sh"), "broker", "5.0"], capture_output=True, text=True, timeout=300, check=False
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("run.sh: unknown RabbitMQ release '5.0': choose system, 4.0 or 4.3")


def test_a_worker_started_again_under_its_name_goes_on_in_its_row_of_the_timeline(monkeypatch):
    """The delay experiment stops w1 and starts it again: one w1 row with its tasks, not an empty one above it."""

    class Stub:  # an exercises.Worker as timeline() reads it: its name, its task spans, when it was killed
        def __init__(self, name, spans, killed_at=None):
            self.name, self.killed_at, self._spans = name, killed_at, spans

        def spans(self):
            return self._spans

    lab = exercises.Lab(url="amqp://", queue="q", dot_seconds=0.1, node=None, sent=["a", "b"])
    lab.workers = [Stub("w1", []), Stub("w1", [(1.0, 2.0, "a", False, "w1"), (2.0, 3.0, "b", False, "w1")])]
    monkeypatch.setattr(lab, "now", lambda: 3.0)
    monkeypatch.setattr(exercises, "use_colour", lambda: False)
    rows = [line for line in exercises.timeline(lab, width=20).splitlines() if "|" in line]
    assert len(rows) == 1 and rows[0].startswith("   w1 |AAAAAAAAA"), rows
    killed = Stub("w2", [(1.0, None, "a", False, "w2")], killed_at=2.0)
    lab.workers = [killed, Stub("w2", [(2.5, 3.0, "b", True, "w2")])]
    [row] = [line for line in exercises.timeline(lab, width=20).splitlines() if "|" in line]
    assert "X" in row and "b" in row and "?" in row, row  # its death, then the redelivered task in the same row


def test_a_threads_next_received_line_waits_for_the_outcome_of_its_last_task(capsys):
    """Console.after()/said(): a task thread starts its next task as soon as one ends, before the connection's
    thread has acked that one and said Done; the lines still come in the order of the events."""

    def delivery(tag: int) -> Delivery:
        return Delivery(None, tag, b"task", pika.BasicProperties(), False, Past())

    console = Console("w1", show_threads=False)
    a, b, c = delivery(1), delivery(2), delivery(3)
    console.after(None, "[x] Received 'a'", 1)  # the thread's first task: at once
    console.after(a, "[x] Received 'b'", 1)  # a's outcome is not out yet: b's line waits for it
    assert capsys.readouterr().out == "w1 [x] Received 'a'\n"
    console.say("[x] Done 'a' in 0.0s")
    console.said(a)
    assert capsys.readouterr().out == "w1 [x] Done 'a' in 0.0s\nw1 [x] Received 'b'\n"
    console.say("[x] Done 'b' in 0.0s")
    console.said(b)  # nothing waited for b
    console.after(b, "[x] Received 'c'", 1)  # b's outcome is out already: at once
    console.said(c)
    assert capsys.readouterr().out == "w1 [x] Done 'b' in 0.0s\nw1 [x] Received 'c'\n"


KILLED_BETWEEN_SPAWN_AND_START_UP_DATA = """
import os, signal, threading
from multiprocessing import util
from workqueue import taskpool

spawn = util.spawnv_passfds

def spawn_then_die(path, args, fds):
    pid = spawn(path, args, fds)
    if "spawn_main" in " ".join(map(str, args)):  # the task's child, not multiprocessing's resource tracker
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 of the worker right after the spawn
    return pid

util.spawnv_passfds = spawn_then_die
if __name__ == "__main__":
    taskpool.ChildProcess((len, b""), taskpool.Spawning(threading.Event(), threading.Lock())).start()
"""


def test_a_child_whose_worker_is_killed_as_it_spawns_it_ends_quietly(tmp_path):
    """kill -9 of the worker just after it spawned a child (CI hit this window once): the child has what it
    needs to start, finds the worker gone and ends without a word (it printed multiprocessing's EOFError
    traceback). run() returns once every holder of the output pipe, the child too, has ended."""
    script = tmp_path / "killed_as_it_spawns.py"
    script.write_text(KILLED_BETWEEN_SPAWN_AND_START_UP_DATA)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(script)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert result.stdout + result.stderr == ""
