"""librdkafka's own mock cluster, from the librdkafka that confluent-kafka bundles (through ctypes):
a Kafka-protocol broker in the test's process that can be told to answer requests with an error,
for the failures a real broker cannot be made to produce on demand (an idempotent producer's
fatal errors). confluent-kafka does not expose it; the clients under test connect to it as to
any broker, by its bootstrap address."""

from __future__ import annotations

import ctypes
import functools

import confluent_kafka.cimpl

# Kafka protocol API keys (the requests an error can be pushed for).
PRODUCE = 0
INIT_PRODUCER_ID = 22


@functools.cache
def _librdkafka() -> ctypes.CDLL:
    """The librdkafka confluent-kafka runs on, whatever its name and wherever it is (bundled with
    the wheel or the system's): a lookup through the handle of confluent-kafka's own extension
    module searches the libraries that module was linked with as well."""
    lib = ctypes.CDLL(confluent_kafka.cimpl.__file__)
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
    lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_mock_cluster_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
    lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_topic_create.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                               ctypes.c_int]
    lib.rd_kafka_mock_push_request_errors_array.argtypes = [
        ctypes.c_void_p, ctypes.c_int16, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)]
    return lib


class MockCluster:
    """A one-broker mock cluster, for a `with` block."""

    def __init__(self):
        self._lib = _librdkafka()
        errstr = ctypes.create_string_buffer(512)
        # The cluster runs on a client handle's threads: a producer of its own, never used.
        self._owner = self._lib.rd_kafka_new(0, self._lib.rd_kafka_conf_new(), errstr, 512)
        if not self._owner:
            raise RuntimeError(errstr.value.decode())
        self._cluster = self._lib.rd_kafka_mock_cluster_new(self._owner, 1)
        if not self._cluster:
            self._lib.rd_kafka_destroy(self._owner)
            raise RuntimeError("librdkafka made no mock cluster")
        self.bootstrap = self._lib.rd_kafka_mock_cluster_bootstraps(self._cluster).decode()

    def create_topic(self, name: str, partitions: int = 1) -> None:
        err = self._lib.rd_kafka_mock_topic_create(self._cluster, name.encode(), partitions, 1)
        assert err == 0, f"mock topic {name}: error {err}"

    def answer_next_requests_with(self, api_key: int, *errors: int) -> None:
        """Answer the next requests of `api_key`, one each, with `errors` (KafkaError codes)."""
        codes = (ctypes.c_int * len(errors))(*errors)
        self._lib.rd_kafka_mock_push_request_errors_array(self._cluster, api_key, len(errors),
                                                          codes)

    def close(self) -> None:
        self._lib.rd_kafka_mock_cluster_destroy(self._cluster)
        self._lib.rd_kafka_destroy(self._owner)

    def __enter__(self) -> MockCluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
