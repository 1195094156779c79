#!/usr/bin/env python
"""The plain way to bulk-publish with pika: one BlockingConnection, a basic_publish per line.

    python pika_loop.py URL QUEUE FILE [--confirm]

With --confirm the channel is in confirm mode, so every basic_publish waits for
the broker's confirm (one round trip per message); without it nothing tells
the publisher whether a message arrived. For the benchmark only."""

import sys

import pika

url, queue, path = sys.argv[1:4]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.queue_declare(queue=queue, durable=True, arguments={"x-queue-type": "quorum"})
if "--confirm" in sys.argv:
    channel.confirm_delivery()
properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
with open(path, "rb") as lines:
    for line in lines:
        channel.basic_publish(exchange="", routing_key=queue, body=line.rstrip(b"\n"), properties=properties)
connection.close()
