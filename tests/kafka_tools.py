"""Reading and writing topics directly in tests, as an outside client would, and counting this
process's librdkafka threads, by which a test sees a client released."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from tests.polling import wait_for


def librdkafka_threads() -> int:
    """This process's librdkafka threads (named rdk:...): every client has some until it is
    destroyed."""
    return sum(_thread_name(comm).startswith("rdk:")
               for comm in Path("/proc/self/task").glob("*/comm"))


def _thread_name(comm: Path) -> str:
    try:
        return comm.read_text()
    except OSError:  # (a thread that ended since its task was listed)
        return ""


def wait_for_librdkafka_threads(count: int, timeout: float = 5.0) -> None:
    """Wait until `count` librdkafka threads run: a thread joined as its client was destroyed can
    still be listed under /proc/self/task for a moment after the join returned."""
    wait_for(lambda: librdkafka_threads() == count, timeout=timeout,
             what=f"this process's librdkafka threads to be {count}")


def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 20.0) -> list:
    """The first `count` messages of `topic`, from every partition (no consumer group involved)."""
    messages = read_topic_until(bootstrap, topic, lambda read: len(read) >= count, timeout)
    assert len(messages) == count, f"read {len(messages)} of {count} messages from {topic}"
    return messages


def read_topic_until(bootstrap: str, topic: str, enough, timeout: float = 20.0) -> list:
    """Messages of `topic` from the beginning, read until `enough(messages)` holds or time is up."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-reader",
                         "enable.auto.commit": False})
    try:
        deadline = time.monotonic() + timeout

        def topic_partitions() -> list[int] | None:
            metadata = consumer.list_topics(topic, timeout=5).topics.get(topic)
            if metadata is not None and metadata.error is None and metadata.partitions:
                return list(metadata.partitions)
            return None

        partitions = wait_for(topic_partitions, timeout=timeout, interval=0.1,
                              what=f"topic {topic} to appear")
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages = []
        while not enough(messages) and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                messages.append(message)
        return messages
    finally:
        consumer.close()


def produce(bootstrap: str, topic: str, value: bytes, key: bytes | None = None,
            headers: dict[str, str] | None = None) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    errors = []
    producer.produce(topic, value=value, key=key,
                     headers=[(k, v.encode()) for k, v in (headers or {}).items()],
                     on_delivery=lambda err, _msg: errors.append(err))
    producer.flush(15)
    assert errors == [None], f"broker did not acknowledge: {errors}"


def produce_unreadable_batch(bootstrap: str, topic: str, records: int) -> None:
    """A record batch of `records` records to partition 0 of `topic` that no client can read: it
    says it is gzip-compressed, and its bytes are no gzip stream. Written over Kafka's protocol
    itself (Produce v3): librdkafka writes none such. Apache Kafka decompresses a compressed batch
    as it is produced and would refuse this one; Tansu, the tests' broker, checks only its CRC,
    and keeps it. On a production broker such a batch comes of a log segment corrupt on disk, or
    is one whose codec the consumer's client lacks. Sent to the first broker of `bootstrap`, which
    is taken to lead the partition (the tests' one broker)."""
    after_crc = struct.pack(">hiqqqhii", _GZIP, records - 1, 0, 0, -1, -1, -1, records)
    after_crc += b"\x1f\x8b but no gzip stream"
    batch = struct.pack(">iBI", 0, 2, _crc32c(after_crc)) + after_crc  # epoch, magic 2, CRC
    batch = struct.pack(">qi", 0, len(batch)) + batch  # base offset (the broker's), length
    request = (struct.pack(">hhi", 0, 3, 1) + _string("test")  # Produce v3, correlation id 1
               + struct.pack(">hhi", -1, -1, 10_000)  # no transactional id, acks=all, timeout
               + struct.pack(">i", 1) + _string(topic)
               + struct.pack(">iii", 1, 0, len(batch)) + batch)  # partition 0
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(struct.pack(">i", len(request)) + request)
        answer = _received(connection, struct.unpack(">i", _received(connection, 4))[0])
    # correlation id, 1 topic (its name), 1 partition: its index, then its error code
    error_code = struct.unpack_from(">h", answer, 4 + 4 + 2 + len(topic.encode()) + 4 + 4)[0]
    assert error_code == 0, f"the broker refused the batch: error {error_code}"


_GZIP = 1


def _string(text: str) -> bytes:
    encoded = text.encode()
    return struct.pack(">h", len(encoded)) + encoded


def _received(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        assert chunk, "the broker closed the connection"
        data += chunk
    return data


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), which a record batch carries."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF
