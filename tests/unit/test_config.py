from dataclasses import fields

from shared.config import ENVIRONMENT, Settings, load_settings


def test_every_setting_has_one_environment_variable_with_a_default():
    assert sorted(f.name.upper() for f in fields(Settings)) == sorted(ENVIRONMENT)


def test_defaults_work_locally_and_the_environment_overrides_them():
    defaults = load_settings({})
    assert defaults.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert defaults.celery_broker_url == defaults.redis_url == "redis://127.0.0.1:6379/0"
    assert defaults.database_url("orders").startswith("postgresql+psycopg2://")
    custom = load_settings({"INBOX_MAX_ATTEMPTS": "9", "TOPIC_PAYMENT_RESULTS": "x.results",
                            "OUTBOX_RELAY_INTERVAL_SECONDS": "0.25"})
    assert (custom.inbox_max_attempts, custom.topic_payment_results) == (9, "x.results")
    assert custom.outbox_relay_interval_seconds == 0.25
