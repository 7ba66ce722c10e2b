"""Reads Kafka topics back for shipper/tests/kafka.rs, as an independent consumer (kafka-python).

Usage: kafka_consume.py BROKER OUT SECONDS TOPIC...

First writes one marker record to every partition of every TOPIC, then reads each partition
from its beginning up to its marker: everything the broker held before the markers, and
nothing after. (The broker's high watermark cannot be used for this: tansu reports it
behind the last batch.) Writes OUT as lines `TOPIC<TAB>KEY<TAB>VALUE` (KEY `-` when there
is none), after one line `#topics<TAB>NAME,...` listing every topic on the broker. Exits 1,
saying why, when a topic does not exist or the markers are not all read within SECONDS.
"""

import sys
import time
import uuid

from kafka import KafkaConsumer, KafkaProducer, TopicPartition


def main():
    broker, out, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    topics = sys.argv[4:]
    deadline = time.monotonic() + seconds
    marker = b"\x00marker " + uuid.uuid4().hex.encode()
    consumer = KafkaConsumer(
        bootstrap_servers=broker,
        enable_auto_commit=False,
        allow_auto_create_topics=False,
        auto_offset_reset="earliest",
    )
    partitions = []
    for topic in topics:
        ids = consumer.partitions_for_topic(topic)
        if not ids:
            sys.exit(f"topic {topic} does not exist on {broker}")
        partitions += [TopicPartition(topic, p) for p in sorted(ids)]
    producer = KafkaProducer(bootstrap_servers=broker, acks="all")
    for tp in partitions:
        producer.send(tp.topic, value=marker, partition=tp.partition)
    producer.flush(timeout=max(1.0, deadline - time.monotonic()))
    producer.close()
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    waiting = set(partitions)
    with open(out, "w", encoding="utf-8") as f:
        names = sorted(t for t in consumer.topics() if not t.startswith("__"))
        f.write("#topics\t" + ",".join(names) + "\n")
        while waiting:
            if time.monotonic() > deadline:
                sys.exit(f"markers of {sorted(map(str, waiting))} not read in {seconds} s")
            for tp, records in consumer.poll(timeout_ms=200, max_records=100000).items():
                for r in records:
                    if tp not in waiting:
                        break
                    if r.value == marker:
                        waiting.discard(tp)
                    elif not r.value.startswith(b"\x00marker "):
                        key = "-" if r.key is None else r.key.decode()
                        f.write(f"{tp.topic}\t{key}\t{r.value.decode()}\n")
    consumer.close()


if __name__ == "__main__":
    main()
