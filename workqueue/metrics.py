"""Prometheus metrics and a health check for worker.py --metrics-port.

prometheus-client is imported only when that option is given (Metrics); without it the worker
uses NoMetrics, which does nothing. One HTTP server in a thread of its own serves:

    GET /metrics   Prometheus text: tasks by outcome, task durations, tasks in progress,
                   the connection's state and its reconnects; asked for OpenMetrics (as Prometheus
                   does with exemplar storage on), the last task counted in each series is named by
                   an exemplar, {task_id="..."}: an id per task as a label would make a series per task
    GET /healthz   200 while the worker is connected and consuming; else 503 and why

Thread safety: prometheus-client's metrics are safe to update from any thread (the task threads
count tasks in progress, the connection's thread counts outcomes). `problem` is written by the
connection's thread only and read by the HTTP thread: one reference, read whole.
"""

from __future__ import annotations

import sys
import threading

from workqueue import printable

OUTCOMES = ("done", "retried", "dead_lettered", "lost", "timed_out")


class Metrics:
    def __init__(self, queue: str, host: str, port: int):
        import prometheus_client as prom  # noqa: PLC0415  (here: only a worker with --metrics-port needs it)

        self.queue = queue
        self.registry = prom.CollectorRegistry()
        self.tasks = prom.Counter(
            "workqueue_tasks",
            "Tasks settled, by outcome (timed_out is counted too when a time limit stopped a task)",
            ["queue", "outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:  # every series present from the start, at 0
            self.tasks.labels(queue, outcome)
        self.seconds = prom.Histogram(
            "workqueue_task_seconds", "Time each task ran", ["queue"], registry=self.registry
        ).labels(queue)
        self.waited = prom.Histogram(
            "workqueue_task_queue_wait_seconds",
            "Time a task waited for a worker: from its publish (its timestamp, whole seconds) or its due time "
            "(a delayed task, a retry, a replay) to its start; tasks without a timestamp are not counted",
            ["queue"],
            buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),  # the timestamp has whole seconds
            registry=self.registry,
        ).labels(queue)
        self.in_progress = prom.Gauge(
            "workqueue_tasks_in_progress", "Tasks running now", ["queue"], registry=self.registry
        ).labels(queue)
        self.connected_gauge = prom.Gauge(
            "workqueue_connected", "1 while connected to the broker and consuming, else 0", registry=self.registry
        )
        self.reconnects = prom.Counter(
            "workqueue_reconnects", "Connections opened again after a loss", registry=self.registry
        )
        self.problem: str | None = "connecting to the broker"  # None: healthy
        self.metrics_app = prom.make_wsgi_app(self.registry)
        # Raises OSError when the port is taken: the caller turns it into a usage error.
        self.server = http_server(host, port, self.app)
        threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True).start()

    def app(self, environ, start_response):
        if environ.get("PATH_INFO") == "/healthz":
            problem = self.problem
            status = "503 Service Unavailable" if problem else "200 OK"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{problem or f'ok: connected and consuming from {self.queue!r}'}\n".encode()]
        return self.metrics_app(environ, start_response)

    # Called by the worker.

    def consuming(self) -> None:
        self.problem = None
        self.connected_gauge.set(1)

    def lost(self, why: str) -> None:
        self.problem = why
        self.connected_gauge.set(0)

    def reconnected(self) -> None:
        self.reconnects.inc()

    def settled(self, outcome: str, delivery=None) -> None:
        self.tasks.labels(self.queue, outcome).inc(exemplar=exemplar(delivery))

    def task_started(self, waited: float | None = None) -> None:
        self.in_progress.inc()
        if waited is not None:
            self.waited.observe(waited)

    def task_ran(self, seconds: float, delivery=None) -> None:
        self.in_progress.dec()
        self.seconds.observe(seconds, exemplar=exemplar(delivery))


def exemplar(delivery) -> dict | None:
    """The task's id, for an exemplar (at most 128 characters in all, by the OpenMetrics rules)."""
    return None if delivery is None else {"task_id": printable(delivery.task_id, limit=100)}


class NoMetrics:
    """Without --metrics-port: the same calls, doing nothing."""

    problem = None

    def consuming(self) -> None:
        pass

    def lost(self, why: str) -> None:
        pass

    def reconnected(self) -> None:
        pass

    def settled(self, outcome: str, delivery=None) -> None:
        pass

    def task_started(self, waited: float | None = None) -> None:
        pass

    def task_ran(self, seconds: float, delivery=None) -> None:
        pass


def http_server(host: str, port: int, app):
    """A WSGI server that serves each request in a thread of its own, quietly. (Imported here: a worker
    without --metrics-port starts faster without the HTTP modules.)"""
    import socketserver  # noqa: PLC0415
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server  # noqa: PLC0415

    class QuietHandler(WSGIRequestHandler):
        timeout = 10  # seconds each read of a request may wait: an idle or stalled client is dropped then

        def log_message(self, *_args) -> None:  # a scrape every 15 s is not news
            pass

    class ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
        """Each request in a thread of its own: a client that connects and sends nothing holds one thread
        for `QuietHandler.timeout` seconds, never the probe behind it."""

        daemon_threads = True  # the worker does not wait for a scrape to exit

        def handle_error(self, request, client_address) -> None:
            """A client that went quiet (the timeout) or away: drop it, without a traceback on stderr."""
            if not isinstance(sys.exc_info()[1], OSError):
                super().handle_error(request, client_address)

    return make_server(host, port, app, server_class=ThreadingServer, handler_class=QuietHandler)
