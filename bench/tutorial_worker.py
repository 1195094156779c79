#!/usr/bin/env python
"""The official tutorial's worker.py (2026, quorum queue), with the URL and queue as arguments:
sleeps in pika's callback, prefetch 1, manual acks. For the benchmark only."""

import sys
import time

import pika

url, queue = sys.argv[1:3]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.queue_declare(queue=queue, durable=True, arguments={"x-queue-type": "quorum"})
print(" [*] Waiting for messages. To exit press CTRL+C")


def callback(ch, method, properties, body):
    print(f" [x] Received {body.decode()}")
    time.sleep(body.count(b"."))
    print(" [x] Done")
    ch.basic_ack(delivery_tag=method.delivery_tag)


channel.basic_qos(prefetch_count=1)
channel.basic_consume(queue=queue, on_message_callback=callback)
channel.start_consuming()
