#!/usr/bin/env python
"""The official tutorial's new_task.py (2026, quorum queue), with the URL and queue as arguments:
one process per message, no publisher confirms. For the benchmark only."""

import sys

import pika

url, queue, *words = sys.argv[1:]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.queue_declare(queue=queue, durable=True, arguments={"x-queue-type": "quorum"})

message = " ".join(words) or "Hello World!"
channel.basic_publish(
    exchange="",
    routing_key=queue,
    body=message,
    properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
)
print(f" [x] Sent {message}")
connection.close()
