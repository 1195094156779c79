"""Every experiment of exercises.py, at a small time scale, on a throwaway node of its own.

Each verdict is checked against what the broker shows afterwards."""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import run_script

# One xdist worker runs this module, so that every experiment runs once (the module fixture below).
pytestmark = pytest.mark.xdist_group("exercises")


@pytest.fixture(scope="module")
def all_experiments():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # no AMQP_URL: the experiments start a node of their own
    # 280 s: under pytest-timeout's 300, so that an overrun shows what the experiments printed (one run went past
    # 300 s on 3.10 in a full run; 52-112 s is usual, alone or beside the other releases).
    result = run_script("exercises.py", "--all", "--dot-seconds", "0.05", "--quiet", "--json", env=env, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    outcomes = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            data = json.loads(line)
            outcomes[data.pop("experiment")] = data
    sections = dict(re.findall(r"=== ([\w-]+): .*?\n(.*?)(?=\n=== |\Z)", result.stdout, re.S))
    return outcomes, sections


def queue_after(section: str, suffix: str = "") -> tuple[int, int]:
    """The (ready, unacked) row that rabbitmqctl showed for the experiment's queue at the end."""
    rows = re.findall(r"^  (ex_\S+)\t(\d+)\t(\d+)$", section, re.M)
    matching = [(int(r), int(u)) for name, r, u in rows if name.endswith(suffix) and (suffix or "." not in name)]
    return matching[-1]


def timeline_letters(section: str) -> tuple[set[str], set[str]]:
    """(letters drawn in the timeline's rows, in upper case; letters its legend names)."""
    chart, legend = section.split("timeline:")[1].split("\n\n")[:2]
    rows = "".join(re.findall(r"^\s+\S+ \|(.*)\|$", chart, re.M))
    return {c.upper() for c in rows if c.isalpha() and c != "X"}, set(re.findall(r"\b([A-Z])=", legend))


def test_every_experiment_runs_and_is_listed(all_experiments):
    outcomes, sections = all_experiments
    listed = run_script("exercises.py", "--list", env={}).stdout
    for name in ("round-robin", "fair-dispatch", "auto-ack-loses", "manual-ack-redelivers", "broker-restart",
                 "poison", "scale-out", "concurrency", "hung-task", "crash-loop", "retry-backoff", "delay",
                 "priority"):  # fmt: skip
        assert name in outcomes and name in sections and name in listed
        assert "timeline:" in sections[name] and "verdict:" in sections[name]
        result = outcomes[name]
        if result.get("lost") == 0 and result.get("done") == result.get("sent"):  # every task ran: each shows
            drawn, named = timeline_letters(sections[name])
            assert named - {"X"} <= drawn, f"{name}: tasks missing from the timeline:\n{sections[name]}"


def test_round_robin_gives_one_worker_every_heavy_task(all_experiments):
    outcomes, sections = all_experiments
    assert outcomes["round-robin"]["done"] == 8 and outcomes["round-robin"]["lost"] == 0
    assert re.search(
        r"did 4 heavy tasks .*did 0 heavy tasks|did 0 heavy tasks .*did 4 heavy tasks", sections["round-robin"]
    )
    # Prefetch 1: each worker takes one of the first two tasks, then a task whenever it is free. Which worker
    # is free first shifts with the load on the machine (a dot is 50 ms here), but none gets every heavy task
    # and none is left with only the light ones, as round-robin does.
    heavy = [int(n) for n in re.findall(r"did (\d) heavy tasks", sections["fair-dispatch"])]
    assert len(heavy) == 2 and sum(heavy) == 4 and min(heavy) >= 1, sections["fair-dispatch"]
    assert queue_after(sections["fair-dispatch"]) == (0, 0)


def test_auto_ack_loses_what_the_killed_workers_held(all_experiments):
    outcomes, sections = all_experiments
    result = outcomes["auto-ack-loses"]
    assert result["lost"] >= 2  # at least the task each killed worker was running
    assert result["lost"] == result["sent"] - result["done"]
    assert queue_after(sections["auto-ack-loses"]) == (0, 0)  # not waiting anywhere: gone
    assert f"{result['lost']} of 12 tasks lost" in sections["auto-ack-loses"]


def test_manual_ack_redelivers_and_loses_nothing(all_experiments):
    outcomes, sections = all_experiments
    result = outcomes["manual-ack-redelivers"]
    assert (result["done"], result["lost"], result["redelivered"]) == (12, 0, 2)
    assert queue_after(sections["manual-ack-redelivers"]) == (0, 0)


def test_broker_restart_keeps_persistent_tasks_only(all_experiments):
    outcomes, sections = all_experiments
    assert (outcomes["broker-restart"]["done"], outcomes["broker-restart"]["lost"]) == (6, 0)
    after = sections["broker-restart"].split("after the restart")[1]
    assert re.search(r"_classic\t0\t0", after) and re.search(r"ex_broker_restart_\d+\t6\t0", after)
    assert "6 of 6 lost" in sections["broker-restart"]


def test_poison_task_ends_in_the_dead_letter_queue(all_experiments):
    outcomes, sections = all_experiments
    result = outcomes["poison"]
    assert (result["done"], result["dead_lettered"], result["lost"]) == (4, 1, 0)
    assert queue_after(sections["poison"], ".dlq") == (1, 0)
    assert "failed 3 times" in sections["poison"]


def test_scale_out_loses_nothing(all_experiments):
    outcomes, sections = all_experiments
    result = outcomes["scale-out"]
    assert (result["done"], result["lost"], result["done_twice"]) == (15, 0, 0)
    assert re.search(r"w2 [1-9]\d*, w3 [1-9]", sections["scale-out"])
    # What w3 received after its SIGTERM went back untouched: the only redeliveries there are. Each has a
    # line, but for one the broker sent in the moment before it saw w3's cancel: pika rejects it itself,
    # unseen (BlockingChannel.basic_cancel; with prefetch 1 there is at most one such).
    handed_back = re.search(r"handed back (\d+) task", sections["scale-out"])
    handed_back = int(handed_back[1]) if handed_back else 0
    assert handed_back <= result["redelivered"] <= handed_back + 1, sections["scale-out"]
    assert "w3 finished its running task, started nothing after the signal" in sections["scale-out"]


def test_concurrency_runs_four_at_once_in_one_process(all_experiments):
    outcomes, sections = all_experiments
    result = outcomes["concurrency"]
    assert (result["done"], result["lost"], result["done_twice"]) == (12, 0, 0)
    assert "up to 4 at once, on 4 threads" in sections["concurrency"]
    assert set(re.findall(r"^  (w1/\d) \|", sections["concurrency"], re.M)) == {"w1/1", "w1/2", "w1/3", "w1/4"}
    assert queue_after(sections["concurrency"]) == (0, 0)


def test_hung_task_is_stopped_and_dead_lettered(all_experiments):
    outcomes, sections = all_experiments
    result = outcomes["hung-task"]
    assert (result["done"], result["dead_lettered"], result["lost"]) == (3, 1, 0)
    assert "stopped at the time limit of 0.25 s 2 times" in sections["hung-task"]
    assert queue_after(sections["hung-task"], ".dlq") == (1, 0)


def test_crash_loop_is_bounded(all_experiments):
    outcomes, sections = all_experiments
    result = outcomes["crash-loop"]
    assert (result["done"], result["dead_lettered"], result["lost"]) == (3, 1, 0)
    assert "'crash' killed the worker running it 1 time." in sections["crash-loop"]
    assert queue_after(sections["crash-loop"], ".dlq") == (1, 0)
    assert re.search(r"^  w1#2 \|", sections["crash-loop"], re.M) and not re.search(
        r"^  w1#3 ", sections["crash-loop"], re.M
    )


def test_retry_backoff_waits_between_tries(all_experiments):
    outcomes, sections = all_experiments
    result = outcomes["retry-backoff"]
    assert (result["done"], result["dead_lettered"], result["lost"]) == (3, 1, 0)
    waited = re.search(r"it waited ([\d.]+)s, ([\d.]+)s, ([\d.]+)s between tries", sections["retry-backoff"])
    assert waited, sections["retry-backoff"]
    for gap in map(float, waited.groups()):
        assert gap <= 0.5 + 2.5, sections["retry-backoff"]  # (when this process read the lines: a loaded
    # machine skews those by tenths) never early, by the worker's own clock against the due time set at the failure:
    started = re.search(
        r"each try started ([-+][\d.]+)s, ([-+][\d.]+)s, ([-+][\d.]+)s from its due", sections["retry-backoff"]
    )
    assert started, sections["retry-backoff"]
    assert all(float(s) >= -0.05 for s in started.groups()), sections["retry-backoff"]
    assert queue_after(sections["retry-backoff"], ".dlq") == (1, 0)


def test_on_a_broker_of_yours_all_skips_the_restart_and_leaves_no_queue(env, broker):
    """--all --url runs every experiment the broker allows, says which it skipped and why, and removes
    every queue it made: wait queues too."""
    before = set(broker.rabbitmqctl("list_queues", "name", "--quiet", "--no-table-headers").split())
    result = run_script("exercises.py", "--all", "--url", broker.url, "--dot-seconds", "0.05", "--quiet", env=env,
                        timeout=400)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "Skipping broker-restart: it restarts the broker" in result.stdout
    ran = re.findall(r"^=== ([\w-]+):", result.stdout, re.M)
    assert "broker-restart" not in ran and {"poison", "hung-task", "crash-loop", "retry-backoff"} <= set(ran)
    after = set(broker.rabbitmqctl("list_queues", "name", "--quiet", "--no-table-headers").split())
    assert after - before == set(), after - before  # ex_poison_*.retry.1s and the rest are gone
    refused = run_script("exercises.py", "broker-restart", "--url", broker.url, env=env)
    assert refused.returncode == 2 and "runs only on a throwaway node" not in refused.stderr
    assert "run it on a throwaway node (without --url or --local)" in refused.stderr
    assert refused.stdout == "", refused.stdout  # refused before any header (it printed one, then refused)


def test_delayed_tasks_wait_in_the_broker_and_urgent_ones_overtake_a_backlog(all_experiments):
    outcomes, sections = all_experiments
    result = outcomes["delay"]
    assert (result["done"], result["lost"], result["redelivered"]) == (3, 0, 0)
    assert re.search(r"\(ex_delay_\d+: 0 unacked;", sections["delay"])  # while they waited, as rabbitmqctl said
    # Each started after its due time, by the worker's own account ("nan" if it did not say).
    started = r"'remind in 5s' [\d.]+s, 'remind in 10s' [\d.]+s, 'remind in 15s' [\d.]+s late"
    assert re.search(started, sections["delay"]), sections["delay"]
    assert queue_after(sections["delay"]) == (0, 0)
    priority = sections["priority"]
    if "refuses" in priority:  # RabbitMQ 3.10
        assert "exit 2" in priority and outcomes["priority"]["sent"] == 0
    else:
        assert re.search(r"started [12] and [23] of 8 once w1 was free \(", priority), priority
        assert outcomes["priority"]["lost"] == 0
