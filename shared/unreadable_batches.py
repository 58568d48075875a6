"""What the inbox consumer says of the record batches its Kafka client cannot read: of each
partition one holds, as an outage is (once as it begins, then once a minute, and once it is over),
never a line per fetch.

librdkafka never passes over such a batch (its records may be messages): it fetches it again, an
error a second or so, each naming the batch's first offset, and the partition waits there. That is
over once a record of the partition at or past that offset comes: the batch itself, its cause
mended (a codec the client lacked), or the records after it, the group's offset moved past it. A
record below it is no such sign: one read again after a failed insert rewound the partition, say.
A partition revoked or lost is forgotten, and its errors still in hand (polled before the
rebalance, handled after it) say nothing until it is assigned again: its new owner says it, and so
does this consumer from the start, should the partition come back to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import KafkaError, TopicPartition

from shared.inbox.storing import ConsumedRecord
from shared.outage_log import OutageLog, OutageWords

# The consumer errors of a record batch librdkafka cannot read, and fetches again and again, never
# past it (its fetcher and rdkafka_msgset_reader.c): any it gives as the batch fails to decompress,
# said "Decompression (codec 0x..) of message at OFFSET ...", whatever its code (_BAD_COMPRESSION:
# the bytes are no stream of the codec; _NOT_IMPLEMENTED: the client has no such codec; _BAD_MSG:
# LZ4 with bytes after its frame; _CRIT_SYS_RESOURCE: an allocation failed), and _BAD_COMPRESSION
# of any text, each at the batch's first offset; or the broker cannot read its log at the
# partition's fetch offset (INVALID_MSG: Kafka's CORRUPT_MESSAGE). Not _NOT_IMPLEMENTED of a batch
# of a format version librdkafka does not know, which it passes over; nor _BAD_MSG of a batch
# failing its CRC, only with check.crcs on (the shop leaves it off), where librdkafka may read on
# past it. Nor UNSUPPORTED_COMPRESSION_TYPE: a broker says so to a client fetching zstd with a
# Fetch version before 10, which librdkafka 2 never sends.
_HOLDING_CODES = (KafkaError._BAD_COMPRESSION, KafkaError.INVALID_MSG)
_DECOMPRESSION_FAILED = "Decompression ("

_WAITS = ("the partition waits there, its records never skipped (README, Deploying: a record"
          " batch the workers cannot read)")
_WORDS = OutageWords(
    begun="%(what)s cannot read %(said)s; " + _WAITS,
    still="%(what)s: records still unreadable after %(seconds).0f s, %(tries)d tries (the last:"
          " %(said)s); " + _WAITS,
    over="%(what)s: records of %(said)s, after %(seconds).0f s, %(tries)d unreadable tries")


def holds_its_partition(message) -> bool:
    """Whether a consumer error (`message`) is of a record batch the client cannot read, which holds
    its partition (_HOLDING_CODES, _DECOMPRESSION_FAILED)."""
    error = message.error()
    return message.offset() is not None and (error.code() in _HOLDING_CODES
                                             or error.str().startswith(_DECOMPRESSION_FAILED))


@dataclass
class _Held:
    """A partition a batch holds: the batch's first offset, and what says so."""

    offset: int
    log: OutageLog


class UnreadableBatches:
    """The partitions record batches the client cannot read hold, each said of on its own."""

    def __init__(self, logger: logging.Logger, what: str,
                 clock: Callable[[], float] = time.monotonic):
        self._logger, self._what, self._clock = logger, what, clock
        self._held: dict[tuple[str, int], _Held] = {}
        # Partitions revoked or lost, and not assigned again since.
        self._gone: set[tuple[str, int]] = set()

    def failed(self, message) -> None:
        """The client could not read the record batch at `message`'s offset (an error message that
        holds_its_partition). One past the batch its partition waited at ends that one's outage,
        and begins its own."""
        where, offset = (message.topic(), message.partition()), message.offset()
        if where in self._gone:
            return
        held = self._held.get(where)
        if held is not None and offset > held.offset:  # read past it, and held again further on
            del self._held[where]
            held.log.back(f"{where[0]} [{where[1]}] are read past offset {held.offset}, up to"
                          f" another batch it cannot read, at {offset}")
            held = None
        if held is None:
            held = self._held[where] = _Held(offset, OutageLog(self._logger, self._what, _WORDS,
                                                               clock=self._clock))
        elif offset < held.offset:  # (fetched from further back: rewound, say)
            held.offset = offset
        held.log.failed(f"{where[0]} [{where[1]}] at {offset}: {message.error().str()}")

    def holding(self) -> bool:
        """Whether a batch holds any partition: while none does, a record read says nothing, and
        the consumer need not tell it (`read`), which it would of every record."""
        return bool(self._held)

    def read(self, record: ConsumedRecord) -> bool:
        """A record was read; returns whether a batch still holds any partition (`holding`)."""
        where = (record.topic, record.partition)
        held = self._held.get(where)
        if held is not None and record.offset >= held.offset:
            del self._held[where]
            held.log.back(f"{record.topic} [{record.partition}] are read again from offset"
                          f" {record.offset}")
        return bool(self._held)

    def forget(self, partitions: list[TopicPartition]) -> None:
        """`partitions` were revoked or lost."""
        for partition in partitions:
            where = (partition.topic, partition.partition)
            self._held.pop(where, None)
            self._gone.add(where)

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """`partitions` were assigned."""
        self._gone.difference_update((p.topic, p.partition) for p in partitions)
