"""chaos.py: a short seeded run of random faults on every release, and its ledger's rules as a table.

The run starts nodes of its own (it restarts and kills them), so it needs nothing from the fixtures."""

from __future__ import annotations

import os
import re
from collections import Counter

import pytest
from conftest import run_script

import chaos

# A seed whose 30 s hold every kind of fault (a broker stop and a kill -9, a memory alarm, warm and cold
# stops, kill -9, a reset and a silent connection), with --max-retries 0: a task that came back unacked
# (its worker died of another task, or handed it back) must still run, not go to the dead-letter queue.
SEED = 119


@pytest.mark.queue_semantics  # ./run.sh test runs it on 4.0 too
@pytest.mark.timeout(600, func_only=True)
def test_a_short_chaos_run_keeps_its_ledger():
    result = run_script(
        "chaos.py", "--seed", str(SEED), "--seconds", "30", "--max-retries", "0", env=dict(os.environ), timeout=540
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ledger = re.search(
        r"^ledger: (\d+) tasks, (\d+) faults, lost 0, dead-lettered (\d+) \((\d+) expected\), ran unrun 0",
        result.stdout,
        re.M,
    )
    assert ledger, result.stdout
    tasks, faults, dead, expected = map(int, ledger.groups())
    during = result.stdout.split("the last of")[0]  # the faults, not the warm stops at the end
    skipped = len(re.findall(r", skipped$", during, re.M))
    assert tasks == 300 and faults == len(chaos.plan_faults(SEED, 30, 1)) - skipped and dead == expected > 0
    for fault in (r"kill -9 w\d \(pid", r"warm stop w\d \(pid", r"cold stop w\d \(pid", r"connection reset w\d \(pid",
                  r"silent connection w\d \(pid", "memory alarm on the broker", "the broker: stop",
                  "the broker: kill -9"):  # fmt: skip
        assert re.search(fault, during), fault
    assert "broken:" not in result.stdout


def test_the_same_seed_plans_the_same_run():
    assert chaos.plan_faults(7, 300, 3) == chaos.plan_faults(7, 300, 3)
    assert chaos.plan_tasks(7, 500) == chaos.plan_tasks(7, 500)
    assert chaos.plan_faults(7, 300, 1) != chaos.plan_faults(8, 300, 1)
    kinds = Counter(body.split()[1] for body in chaos.plan_tasks(7, 5000))
    assert set(kinds) == set(chaos.KINDS) and kinds["ok"] > 4500


def ledger(**changes) -> chaos.Ledger:
    """Four tasks as they should end: two done, one failed, one crashed, both dead-lettered for it."""
    base = chaos.Ledger(
        sent={"t1": "ok", "t2": "ok", "t3": "fail", "t4": "crash"},
        starts=Counter({"t1": 1, "t2": 1, "t3": 1, "t4": 2}),
        ends=Counter({"t1": 1, "t2": 1}),
        dead={"t3": ["RuntimeError: meant to fail"], "t4": ["killed by signal 9 (SIGKILL)"]},
        faults=5,
    )
    for name, value in changes.items():
        setattr(base, name, value)
    return base


@pytest.mark.parametrize(
    ("changes", "broken"),
    [
        ({}, None),
        ({"ends": Counter({"t1": 2, "t2": 1})}, None),  # a duplicate is counted, not a failure
        ({"ends": Counter({"t1": 1})}, "lost: confirmed, never ended, not in the dead-letter queue: 1: t2"),
        (
            {"dead": {"t2": ["it came back 1 times"], "t3": ["meant to fail"], "t4": ["killed by signal 9"]},
             "starts": Counter({"t1": 1, "t3": 1, "t4": 1})},
            "dead-lettered without having run: 1: t2",
        ),
        (
            {"dead": {"t1": ["it came back 1 times"], "t3": ["meant to fail"], "t4": ["killed by signal 9"]}},
            "dead-lettered, not meant to be (or not for that reason): 1: t1 (ok, ran 1x: it came back 1 times)",
        ),
        (
            {"dead": {"t3": ["meant to fail"], "t4": ["it came back 4 times"]}},
            "dead-lettered, not meant to be (or not for that reason): 1: t4 (crash",
        ),
        ({"dead": {"t4": ["killed by signal 9"]}, "ends": Counter({"t1": 1, "t2": 1, "t3": 1})},
         "meant to fail or crash, yet not in the dead-letter queue: 1: t3"),
        ({"left": 2}, "the queues still held 2 tasks at the end"),
        ({"producer_exit": 6}, "the producer exited with code 6"),
        ({"overruns": ["w2's warm stop ran past 30 s"]}, "a stop overran its bound: 1: w2's warm stop ran past 30 s"),
        ({"bad_exits": ["w1 exit 1"]}, "a worker exited as it never should: 1: w1 exit 1"),
    ],
)  # fmt: skip
def test_the_ledger_names_each_broken_rule(changes, broken):
    line, found = chaos.check(ledger(**changes))
    assert line.startswith("ledger: 4 tasks, 5 faults, lost ")
    if broken is None:
        assert found == []
    else:
        assert any(rule.startswith(broken) for rule in found), found


def test_the_ledger_line_counts_what_became_of_every_task():
    line, found = chaos.check(ledger(ends=Counter({"t1": 2, "t2": 1})))
    assert line == (
        "ledger: 4 tasks, 5 faults, lost 0, dead-lettered 2 (2 expected), ran unrun 0, duplicates 1 (t1 ran 2x)"
    )
    assert found == []
