"""How the shop creates its topics (pure logic: the settings a NewTopic is built from)."""

from shared.config import load_settings
from shared.kafka import new_topic


def test_a_single_broker_gets_one_replica_of_each_partition():
    topic = new_topic(load_settings({}), "orders.payment-requested")
    assert (topic.topic, topic.num_partitions, topic.replication_factor) == (
        "orders.payment-requested", 3, 1)
    assert topic.config == {}


def test_on_a_cluster_a_write_needs_all_replicas_in_sync_but_one():
    settings = load_settings({"KAFKA_TOPIC_REPLICATION_FACTOR": "3",
                              "KAFKA_TOPIC_PARTITIONS": "6"})
    topic = new_topic(settings, "payments.payment-results")
    assert (topic.num_partitions, topic.replication_factor) == (6, 3)
    assert topic.config == {"min.insync.replicas": "2"}
    assert new_topic(load_settings({"KAFKA_TOPIC_REPLICATION_FACTOR": "2"}), "t").config == {}
