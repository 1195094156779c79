"""python bench/handoff.py: what handing a task to a thread and its result back costs, for an empty task.

The worker's way (workqueue/taskpool.py: the connection's thread puts a delivery into one SimpleQueue,
a task thread puts the result into another) against concurrent.futures.ThreadPoolExecutor (submit, then
wait on the Future), in alternating runs of 20,000 round trips. The issue that asked for the worker's
rework said to use concurrent.futures if it measured as fast; this is that measurement."""

import concurrent.futures
import queue
import statistics
import threading
import time

N = 20000


def simple_queues():
    todo, finished = queue.SimpleQueue(), queue.SimpleQueue()

    def serve():
        while (item := todo.get()) is not None:
            finished.put(str(item))  # the same empty task as below

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    start = time.perf_counter()
    for i in range(N):
        todo.put(i)
        finished.get(timeout=1)
    took = time.perf_counter() - start
    todo.put(None)
    t.join()
    return took / N * 1e6


def futures():
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: None).result()
        start = time.perf_counter()
        for i in range(N):
            pool.submit(str, i).result(timeout=1)
        return (time.perf_counter() - start) / N * 1e6


r = {"SimpleQueue pair": [], "ThreadPoolExecutor + Future": []}
for _ in range(5):
    r["SimpleQueue pair"].append(simple_queues())
    r["ThreadPoolExecutor + Future"].append(futures())
for k, v in r.items():
    print(f"{k}: {statistics.median(v):.1f} µs per round trip (runs: {', '.join(f'{x:.1f}' for x in v)})")
