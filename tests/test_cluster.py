"""A 3-node cluster with a quorum queue: kill -9 the node everyone is connected to, lose nothing."""

from __future__ import annotations

import json
import re

import pytest
from conftest import Script, done_tasks, ready_count, wait_until

from local_broker import BrokerCluster


@pytest.fixture(scope="module")
def cluster():
    cluster = BrokerCluster(size=3, name="tc").start()
    yield cluster
    cluster.destroy()


def test_killing_the_connected_node_loses_no_confirmed_task(cluster, env, tmp_path):
    first, second, _ = cluster.nodes
    env = {**env, "AMQP_URL": ",".join(cluster.urls)}  # every script tries the first node first
    queue, count = "t_failover", 60_000
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"t{i}\n" for i in range(count)))
    scripts = []
    try:
        workers = [
            Script("worker.py", "--queue", queue, "--name", f"w{n}", "--prefetch", "20", env=env) for n in (1, 2)
        ]
        scripts += workers
        for worker in workers:
            worker.wait_for("Waiting for messages")
        members = json.loads(second.rabbitmqctl("list_queues", "name", "members", "--formatter", "json"))
        assert {q["name"]: len(q["members"]) for q in members}[queue] == 3  # a replica on every node

        producer = Script("new_task.py", "--queue", queue, "--file", str(tasks), env=env)
        scripts.append(producer)
        wait_until(lambda: ready_count(second.url, queue) > 2000, timeout=60, what="the producer to get going")
        first.kill()

        assert producer.wait(timeout=180) == 0, producer.output[-2000:]
        assert f"Sent {count:,} messages, all confirmed" in producer.output
        assert "connection lost" in producer.output
        for worker in workers:
            worker.wait_for(r"connection lost", timeout=30)
        expected = {f"t{i}" for i in range(count)}

        wait_until(lambda: set(done_tasks(*workers)) >= expected, timeout=240, what="every task to be done")
        assert set(done_tasks(*workers)) == expected
        resent = re.search(r"([\d,]+) were sent again", producer.output)
        done_lines = sum(w.count(r"\[x\] Done") for w in workers)
        print(f"\nfailover: {count:,} tasks; re-sent by the producer: {resent[1] if resent else 0}; "
              f"done {done_lines:,} times in all ({done_lines - count:,} repeats)")  # fmt: skip
        assert all(worker.proc.poll() is None for worker in workers)  # still running, on the other nodes
        assert second.queue_counts(queue) == (0, 0)

        first.start()
        cluster.wait_running(3, asking=second)
        assert first.nodename in cluster.running_nodes(asking=second)
    finally:
        for script in scripts:
            script.stop()
