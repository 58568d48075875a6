import secrets
import socket
from dataclasses import fields

import pytest

from devstack.local_secrets import SECRET_BYTES
from shared.config import (ENVIRONMENT, HOW_TO_MAKE_A_SECRET, PUBLISHED_SECRETS, SECRETS, SERVICES,
                           Settings, get_settings, load_settings, settings_or_exit)
from tests.environment import TEST_SECRETS


def test_every_setting_has_one_environment_variable_with_a_default():
    assert sorted(f.name.upper() for f in fields(Settings)) == sorted(ENVIRONMENT)


def test_defaults_work_locally_and_the_environment_overrides_them():
    defaults = load_settings({})
    assert defaults.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert defaults.celery_broker_url == defaults.redis_url == "redis://127.0.0.1:6379/0"
    assert defaults.cache_url() == defaults.redis_url
    assert defaults.database_url("orders").startswith("postgresql+psycopg2://")
    custom = load_settings({"INBOX_MAX_ATTEMPTS": "9", "TOPIC_PAYMENT_RESULTS": "x.results",
                            "OUTBOX_RELAY_INTERVAL_SECONDS": "0.25"})
    assert (custom.inbox_max_attempts, custom.topic_payment_results) == (9, "x.results")
    assert custom.outbox_relay_interval_seconds == 0.25


def test_the_defaults_are_the_ports_and_databases_the_shop_is_known_by():
    """Where the issues that made the shop put each part (orders on 8001 and gRPC 50051, payments
    on 8002 and 50052, a database each, the gateway calling them over gRPC), which the devstack,
    the compose file and the README name too."""
    defaults = load_settings({})
    assert [defaults.database_url(service).rsplit("/", 1)[1] for service in SERVICES] == [
        f"hseshop_{service}" for service in SERVICES]
    assert (defaults.orders_service_url, defaults.payments_service_url) == (
        "http://127.0.0.1:8001", "http://127.0.0.1:8002")
    assert (defaults.orders_grpc_bind, defaults.orders_grpc_target) == ("127.0.0.1:50051",) * 2
    assert (defaults.payments_grpc_bind, defaults.payments_grpc_target) == (
        "127.0.0.1:50052",) * 2
    assert defaults.gateway_upstream_transport == "grpc"


def test_the_forms_a_grpc_target_or_a_service_url_may_take_are_taken():
    settings = load_settings({"ORDERS_GRPC_TARGET": "dns:///orders-grpc:50051",
                              "PAYMENTS_GRPC_TARGET": "[::1]:50052",
                              "ORDERS_GRPC_BIND": "[::]:50051",
                              "PAYMENTS_GRPC_BIND": "unix:/run/hseshop/payments.sock",
                              "PAYMENTS_SERVICE_URL": "https://payments.internal"})
    assert settings.orders_grpc_target == "dns:///orders-grpc:50051"
    assert settings.payments_grpc_target == "[::1]:50052"


@pytest.mark.parametrize("value", [
    "orders-grpc:50051", "127.0.0.1:50051", "[::1]:50051", "unix:/run/hseshop/orders.sock",
    "unix:/run/my shop/orders grpc.sock", "unix:///run/my shop/orders.sock",
    "unix-abstract:hseshop orders", "vsock:3:50051",
])
def test_a_grpc_address_of_any_valid_form_is_taken_a_socket_path_with_spaces_too(value):
    for role in ("TARGET", "BIND"):
        settings = load_settings({f"ORDERS_GRPC_{role}": value})
        assert getattr(settings, f"orders_grpc_{role.lower()}") == value


@pytest.mark.parametrize("value", [
    "dns:///orders-grpc:50051", "dns://127.0.0.53/orders-grpc:50051", "ipv4:127.0.0.1:50051",
    "ipv6:[::1]:50051",
])
def test_a_grpc_name_is_taken_as_a_target_and_refused_as_a_bind(value):
    """A server binds no name of gRPC's: given one, its start failed in a traceback, "Failed to
    bind to address", naming no setting."""
    assert load_settings({"ORDERS_GRPC_TARGET": value}).orders_grpc_target == value
    with pytest.raises(ValueError, match="ORDERS_GRPC_BIND=.*: expected host:port, a socket's"):
        load_settings({"ORDERS_GRPC_BIND": value})


@pytest.mark.parametrize("value, blank", [
    ("ord ers:50051", " "), ("orders-grpc :50051", " "), (" 127.0.0.1:50051", " "),
    ("127.0.0.1:50051\n", "\n"), ("[::1]\t:50051", "\t"), ("dns:///orders grpc:50051", " "),
    ("dns:///orders-grpc:50051 ", " "), ("ipv4:127.0.0.1: 50051", " "),
    ("orders\u00a0grpc:50051", "\u00a0"), ("orders\u200bgrpc:50051", "\u200b"),
])
def test_a_grpc_host_with_whitespace_or_a_control_character_is_refused_at_start_up(value, blank):
    """Such a host passed as host:port: a target then failed every call with a 503 (while /health
    answered 200), and a bind failed the gRPC server's start without naming the setting."""
    for variable in ("ORDERS_GRPC_TARGET", "PAYMENTS_GRPC_TARGET", "ORDERS_GRPC_BIND",
                     "PAYMENTS_GRPC_BIND"):
        with pytest.raises(ValueError, match="expected no whitespace nor control character"
                                             ) as refused:
            load_settings({variable: value})
        assert str(refused.value) == (f"{variable}={value!r}: expected no whitespace nor control"
                                      f" character, and found {blank!r} at position"
                                      f" {value.index(blank)}")


@pytest.mark.parametrize("value, position", [
    ("unix:/run/hseshop/orders.sock\n", 29), ("unix:/run/hseshop/orders.sock\r", 29),
    ("unix:/run/my shop/orders.sock\r\n", 29), ("unix:/run/my shop/orders.sock ", 29),
    ("unix: /run/my shop/orders.sock", 5), ("unix:/run/my\tshop/orders.sock", 12),
    ("unix:/run/my\u200bshop/orders.sock", 12), ("unix-abstract:hseshop orders\r", 28),
    ("unix-abstract: hseshop orders", 14), ("unix-abstract:hseshop orders\n", 28),
])
def test_a_socket_path_with_a_control_character_or_whitespace_at_either_end_is_refused(value,
                                                                                       position):
    """A space within the path binds and connects; a line end (an env file's "\r" written with
    CRLF line ends) bound a socket whose name holds it, which no target then named."""
    for variable in ("ORDERS_GRPC_TARGET", "PAYMENTS_GRPC_BIND"):
        with pytest.raises(ValueError) as refused:
            load_settings({variable: value})
        assert str(refused.value) == (f"{variable}={value!r}: expected no whitespace nor control"
                                      f" character, and found {value[position]!r} at position"
                                      f" {position}")


def test_a_service_urls_trailing_slash_is_dropped():
    """The gateway appends "/orders": it sent "//orders", which Werkzeug's server collapses to
    "/orders" and gunicorn keeps (the signature then for another path: every call a 401)."""
    settings = load_settings({"ORDERS_SERVICE_URL": "http://orders:8001/",
                              "PAYMENTS_SERVICE_URL": "https://payments.internal"})
    assert settings.orders_service_url == "http://orders:8001"
    assert settings.payments_service_url == "https://payments.internal"


@pytest.mark.parametrize("variable, value, expected", [
    ("OUTBOX_RELAY_BATCH_SIZE", "0", "above 0"),
    ("OUTBOX_RELAY_INTERVAL_SECONDS", "-2", "above 0"),
    ("INBOX_SWEEP_INTERVAL_SECONDS", "0", "above 0"),
    ("IDEMPOTENCY_KEY_RETENTION_SECONDS", "-3600", "above 0"),
    ("INBOX_RETENTION_SECONDS", "nan", "above 0"),
    ("UPSTREAM_TIMEOUT_SECONDS", "inf", "above 0"),
    # (A deadline further off a service takes as none; one of 1e20 s wrote 21 digits, refused.)
    ("UPSTREAM_TIMEOUT_SECONDS", "3600.5", "no more than 3600"),
    ("UPSTREAM_TIMEOUT_SECONDS", "1e20", "no more than 3600"),
    ("INBOX_MAX_ATTEMPTS", "5.0", "a whole number"),
    ("RATE_LIMIT_PER_MINUTE", "lots", "a whole number"),
    ("CACHE_TTL_SECONDS", "0", "above 0"),
    # (a socket's timeout past some 9.2e9 s raises OverflowError: every request's read a 500)
    ("REQUEST_READ_TIMEOUT_SECONDS", "1e10", "no more than 86400"),
    ("REQUEST_HEAD_TIMEOUT_SECONDS", "86400.5", "no more than 86400"),
    ("REQUEST_READ_TIMEOUT_SECONDS", "0", "above 0"),
    ("INBOX_SWEEP_MIN_AGE_SECONDS", "ten", "a number"),
    ("GATEWAY_UPSTREAM_TRANSPORT", "carrier-pigeon", "one of grpc, http"),
    ("ORDERS_GRPC_TARGET", "127.0.0.1:abc", "host:port"),
    ("ORDERS_GRPC_TARGET", "http://orders-grpc:50051", "host:port"),
    ("PAYMENTS_GRPC_TARGET", "payments-grpc", "host:port"),
    ("PAYMENTS_GRPC_BIND", "0.0.0.0:70000", "host:port"),
    # (a gRPC server binds no name of those schemes: its start failed in a traceback)
    ("ORDERS_GRPC_BIND", "dns:///127.0.0.1:50051", "a socket's unix:/path"),
    ("PAYMENTS_GRPC_BIND", "ipv4:127.0.0.1:50052", "a socket's unix:/path"),
    ("ORDERS_GRPC_BIND", "vsock:", "or vsock:cid:port"),
    ("ORDERS_GRPC_BIND", "vsock:oops", "or vsock:cid:port"),
    ("ORDERS_GRPC_BIND", "vsock:3:70000", "or vsock:cid:port"),
    ("ORDERS_GRPC_BIND", "vsock:3:4:50051", "or vsock:cid:port"),
    ("ORDERS_SERVICE_URL", "orders:8001", "an http:// or https:// URL"),
    ("ORDERS_SERVICE_URL", "http://orders:8001/api", "with no path"),
    ("PAYMENTS_SERVICE_URL", "http://payments:8002//", "with no path"),
    ("PAYMENTS_SERVICE_URL", "http://payments:8002/?x=1", "with no path"),
    ("PAYMENTS_SERVICE_URL", "http://payments:port", "with no path"),
    ("GATEWAY_TRUSTED_PROXY_HOPS", "-1", "of 0 or above"),
    ("GATEWAY_TRUSTED_PROXY_HOPS", "x", "a whole number"),
    ("GATEWAY_TRUSTED_PROXY_HOPS", "1.5", "a whole number"),
    ("ORDERS_DATABASE_URL", "hseshop_orders", "a PostgreSQL URL"),
    ("PAYMENTS_DATABASE_URL", "mysql://shop@db/hseshop_payments", "a PostgreSQL URL"),
    ("GATEWAY_DATABASE_URL", "postgresql://shop@db:port/hseshop_gateway", "a PostgreSQL URL"),
    ("REDIS_URL", "redis:6379", "a Redis URL"),
    ("REDIS_URL", "redis:/0", "a Redis URL"),
    ("REDIS_URL", "redis://redis:6379/zero", "a Redis URL"),
    ("REDIS_URL", "http://redis:6379/0", "a Redis URL"),
    ("CELERY_BROKER_URL", "redis://redis:port/0", "a Redis URL"),
    ("CACHE_REDIS_URL", "cache-redis:6379", "a Redis URL"),
])
def test_a_value_a_setting_cannot_take_is_refused_naming_its_variable(variable, value, expected):
    """At start-up, before anything runs on it: each number is a size, a count or a length of
    time, and the transport one of two."""
    with pytest.raises(ValueError, match=expected) as refused:
        load_settings({variable: value})
    assert str(refused.value).startswith(f"{variable}={value!r}")


@pytest.mark.parametrize("value", [
    "http://orders:8001\t", "http://orders:8001\n", "http://ord ers:8001", "http://orders:8001/ ",
    " http://orders:8001", "http://orders\r:8001", "http://orders:8001\x00",
    "http://orders\u00a0:8001", "http://orders\u200b:8001", "http://orders:8001\x85",
])
def test_a_service_url_with_whitespace_or_a_control_character_is_refused_saying_so(value):
    """urlsplit drops tabs and line breaks and takes a space in the host: such a URL passed and
    failed every call with a 502 (and one with a trailing space after its "/" was refused as
    having a path)."""
    for variable in ("ORDERS_SERVICE_URL", "PAYMENTS_SERVICE_URL"):
        with pytest.raises(ValueError, match="expected no whitespace nor control character"
                                             ) as refused:
            load_settings({variable: value})
        assert str(refused.value).startswith(f"{variable}={value!r}")


def test_zero_trusted_proxies_is_taken_the_default_and_a_number_above_it_too():
    """0 proxies in front of the gateway is a count like any other, and the default: no address
    forwarded is believed."""
    assert load_settings({}).gateway_trusted_proxy_hops == 0
    assert load_settings({"GATEWAY_TRUSTED_PROXY_HOPS": "0"}).gateway_trusted_proxy_hops == 0
    assert load_settings({"GATEWAY_TRUSTED_PROXY_HOPS": "2"}).gateway_trusted_proxy_hops == 2


@pytest.mark.parametrize("secret", ["INTERNAL_AUTH_SECRET", "AUTH_TOKEN_SECRET"])
def test_an_empty_secret_is_refused_not_replaced_by_the_public_default(secret):
    """A deployment whose secret came out empty (`${AUTH_TOKEN_SECRET}` unset, a missing key)
    would otherwise sign with the default anyone can read in shared/config.py."""
    with pytest.raises(ValueError, match="cannot be empty") as refused:
        load_settings({secret: ""})
    assert str(refused.value).startswith(f"{secret}=''")
    own = "s3cret-of-our-own-" + "x" * 14
    assert getattr(load_settings({secret: own}), secret.lower()) == own


@pytest.mark.parametrize("secret", ["INTERNAL_AUTH_SECRET", "AUTH_TOKEN_SECRET"])
@pytest.mark.parametrize("short", ["shop2024", "x" * 31, "\u00e9" * 15])
def test_a_secret_shorter_than_32_bytes_is_refused_saying_how_to_make_one(secret, short):
    """Both sign with HMAC-SHA256: anyone holding one token could guess a short secret offline
    ("shop2024" in seconds) and sign tokens, or identities, of their own."""
    with pytest.raises(ValueError) as refused:
        load_settings({secret: short})
    said = str(refused.value)
    assert said.startswith(f"{secret} is {len(short.encode())} bytes long"), said
    assert "at least 32" in said and HOW_TO_MAKE_A_SECRET in said
    assert short not in said


@pytest.mark.parametrize("secret", ["INTERNAL_AUTH_SECRET", "AUTH_TOKEN_SECRET"])
def test_a_secret_of_32_bytes_is_taken_counted_in_bytes_not_characters(secret):
    for own in ("x" * 32, "\u00e9" * 16):
        assert getattr(load_settings({secret: own}), secret.lower()) == own


def test_every_secret_the_shop_ships_or_sets_is_long_enough_to_start():
    """The defaults, the placeholders of deploy/*.env (tests/unit/test_published_secrets.py keeps
    them in step with PUBLISHED_SECRETS: still only warned of), the tests' own and those `make run`
    and the benchmark make."""
    made = {name: secrets.token_urlsafe(SECRET_BYTES) for name in SECRETS}
    for given in ({}, TEST_SECRETS, made,
                  *({name: published} for name in SECRETS
                    for published in PUBLISHED_SECRETS[name])):
        load_settings(given)


@pytest.mark.parametrize("value", ["postgresql://postgres@127.0.0.1:5432/hseshop_orders",
                                   "postgres://shop:pw@db/orders",
                                   "postgresql+psycopg2://shop:p%40ss@db:5432/orders",
                                   "postgresql:///orders?host=/run/postgresql"])
def test_a_database_url_of_postgresql_is_taken(value):
    assert load_settings({"ORDERS_DATABASE_URL": value}).orders_database_url == value


@pytest.mark.parametrize("value, shown", [
    ("postgresql://shop:s3cret@db:port/orders", "postgresql://shop:***@db:port/orders"),
    ("mysql://shop:s3cret@db/orders", "mysql://shop:***@db/orders"),
    ("shop:s3cret@db:5432/orders", "shop:***@db:5432/orders"),  # (no scheme)
    ("postgresql:/shop:s3cret@db/orders", "postgresql:/shop:***@db/orders"),  # (one slash)
    ("postgresql://shop:s3:cr@et@db:port/orders", "postgresql://shop:***@db:port/orders"),
    ("postgresql://shop@db:port/orders?password=s3cret&sslmode=require",
     "postgresql://shop@db:port/orders?password=***&sslmode=require"),
    ("mysql://shop@db/orders?sslmode=require&PASSWORD=s3cret",
     "mysql://shop@db/orders?sslmode=require&PASSWORD=***"),
    ("mysql://shop@db:3306/orders", "mysql://shop@db:3306/orders"),  # (no password: as typed)
])
def test_a_database_url_refused_is_shown_without_its_password(value, shown):
    """Whatever lies between the user's ":" and the "@", with a scheme and its "//" or not, and
    a query's password= (libpq's, redis-py's), is hidden."""
    with pytest.raises(ValueError, match="a PostgreSQL URL") as refused:
        load_settings({"ORDERS_DATABASE_URL": value})
    assert "s3" not in str(refused.value)
    assert str(refused.value).startswith(f"ORDERS_DATABASE_URL={shown!r}: ")


@pytest.mark.parametrize("variable, value, shown", [
    ("ORDERS_DATABASE_URL", "postgresql://shop:s3cret@db:5432/orders\n",
     "postgresql://shop:***@db:5432/orders\n"),  # (a secret written with echo)
    ("PAYMENTS_DATABASE_URL", "postgresql://shop@d\tb/payments", "postgresql://shop@d\tb/payments"),
    ("REDIS_URL", "redis://:s3cret@redis:6379/0 ", "redis://:***@redis:6379/0 "),
    ("CELERY_BROKER_URL", "redis://redis:6379/0\r", "redis://redis:6379/0\r"),  # (CRLF env file)
    ("CACHE_REDIS_URL", "redis://cache-redis:6379/0 ", "redis://cache-redis:6379/0 "),
])
def test_a_database_or_redis_url_with_a_control_character_or_whitespace_at_an_end_is_refused(
        variable, value, shown):
    """As a service URL is: such a URL passed its form and failed the first connection, in a
    traceback. Its password hidden."""
    with pytest.raises(ValueError, match="expected no whitespace nor control character"
                                         ) as refused:
        load_settings({variable: value})
    assert str(refused.value).startswith(f"{variable}={shown!r}: ")


@pytest.mark.parametrize("variable, value", [
    # (SQLAlchemy writes a password's space as it is: URL.render_as_string)
    ("ORDERS_DATABASE_URL", "postgresql://shop:orders-1 it%27s@db:5432/orders"),
    ("CELERY_BROKER_URL", "redis+socket:///run/my shop/redis.sock"),
    ("CELERY_BROKER_URL", "redis+socket:///run/my%20shop/redis.sock")])
def test_a_space_within_a_database_or_redis_url_is_the_urls_to_take(variable, value):
    assert getattr(load_settings({variable: value}), variable.lower()) == value


@pytest.mark.parametrize("value", ["redis://127.0.0.1:6379/0", "redis://:pw@redis:6379/12",
                                   "rediss://redis.internal", "redis://[::1]:6379",
                                   "redis://", "redis:///0", "redis://:pw@:6380/1"])
def test_a_redis_url_is_taken_and_the_celery_broker_and_cache_are_it_unless_set(value):
    settings = load_settings({"REDIS_URL": value})
    assert settings.redis_url == settings.celery_broker_url == settings.cache_url() == value
    assert load_settings({"CELERY_BROKER_URL": value}).celery_broker_url == value
    apart = load_settings({"CACHE_REDIS_URL": value})
    assert (apart.cache_url(), apart.redis_url) == (value, "redis://127.0.0.1:6379/0")


@pytest.mark.parametrize("variable, taken", [
    ("REDIS_URL", ("redis://redis:6379/0", "rediss://redis:6380/0", "unix:///run/redis.sock")),
    ("CACHE_REDIS_URL", ("redis://cache:6379/0", "rediss://cache:6380/0",
                         "unix:///run/cache.sock")),
    ("CELERY_BROKER_URL", ("redis://redis:6379/0", "rediss://redis:6380/0",
                           "redis+socket:///run/redis.sock")),
])
def test_a_redis_url_refused_is_told_every_scheme_its_variable_takes(variable, taken):
    """The message named redis:// alone, where rediss:// and a socket's URL are taken too."""
    for value in taken:  # (a socket's REDIS_URL takes a broker's URL of its own)
        load_settings({"CELERY_BROKER_URL": "redis+socket:///run/redis.sock", variable: value})
    with pytest.raises(ValueError, match="a Redis URL") as refused:
        load_settings({variable: "http://redis:6379/0"})
    for value in taken:
        assert f"{value.partition('://')[0]}://" in str(refused.value), value


def test_a_redis_socket_is_unix_for_redis_and_redis_socket_for_celerys_broker():
    """kombu, Celery's broker, reads a socket's URL as redis+socket:///path (unix:///path it read
    as 127.0.0.1 and a database named by the path: a worker failed in a traceback as it
    connected); redis-py reads only unix:///path."""
    settings = load_settings({"REDIS_URL": "unix:///run/redis/redis.sock?db=2",
                              "CELERY_BROKER_URL": "redis+socket:///run/redis/redis.sock"})
    assert settings.redis_url == "unix:///run/redis/redis.sock?db=2"
    assert settings.celery_broker_url == "redis+socket:///run/redis/redis.sock"
    with pytest.raises(ValueError, match="a Redis URL as Celery reads it") as refused:
        load_settings({"CELERY_BROKER_URL": "unix:///run/redis/redis.sock"})
    assert str(refused.value).startswith("CELERY_BROKER_URL='unix:///run/redis/redis.sock'")
    with pytest.raises(ValueError) as refused:  # (the broker being REDIS_URL's)
        load_settings({"REDIS_URL": "unix://:s3cret@/run/redis/redis.sock"})
    assert str(refused.value) == (
        "REDIS_URL='unix://:***@/run/redis/redis.sock': Celery's broker (with CELERY_BROKER_URL"
        " unset) cannot take a unix:// URL: set CELERY_BROKER_URL=redis+socket:///path as well")
    with pytest.raises(ValueError, match="a Redis URL"):  # (redis-py reads no redis+socket://)
        load_settings({"REDIS_URL": "redis+socket:///run/redis/redis.sock"})


@pytest.mark.parametrize("value, shown", [
    ("redis://:s3cret@redis:6379/twelve", "redis://:***@redis:6379/twelve"),
    ("redis://redis:6379/twelve?password=s3cret", "redis://redis:6379/twelve?password=***"),
])
def test_a_redis_url_refused_is_shown_without_its_password(value, shown):
    with pytest.raises(ValueError, match="a Redis URL") as refused:
        load_settings({"REDIS_URL": value})
    assert "s3cret" not in str(refused.value)
    assert str(refused.value).startswith(f"REDIS_URL={shown!r}: ")


def test_an_operators_command_given_a_setting_it_cannot_take_says_it_in_a_line_and_exits_1(
        monkeypatch, capsys):
    """shared.migrations' and tasks.parked's one way of saying it (settings_or_exit)."""
    monkeypatch.setenv("INBOX_MAX_ATTEMPTS", "five")
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exited:
            settings_or_exit("payments inbox: nothing done")
        assert exited.value.code == 1
        assert capsys.readouterr().err == (
            "payments inbox: nothing done: INBOX_MAX_ATTEMPTS='five': expected a whole number\n")
    finally:
        get_settings.cache_clear()


def test_the_longest_upstream_timeout_taken_gives_a_deadline_the_services_read():
    """The gateway's deadline is UPSTREAM_TIMEOUT_SECONDS on, written as a moment the services
    read (shared.caller_deadline), and no further off than they take as one."""
    from shared.caller_deadline import deadline_given, deadline_moment

    longest = load_settings({"UPSTREAM_TIMEOUT_SECONDS": "3600"}).upstream_timeout_seconds
    assert deadline_given(deadline_moment(longest)) is not None
    with pytest.raises(ValueError, match="no deadline a service takes"):
        deadline_moment(1e20)


def test_a_request_read_timeout_of_a_day_is_taken_and_a_socket_takes_it():
    """The most a request's read timeouts can be (AT_MOST): a socket's timeout past some 9.2e9 s
    raised OverflowError, every request's read a 500."""
    settings = load_settings({"REQUEST_READ_TIMEOUT_SECONDS": "86400",
                              "REQUEST_HEAD_TIMEOUT_SECONDS": "86400"})
    assert settings.request_read_timeout_seconds == settings.request_head_timeout_seconds == 86400
    with socket.socket() as socket_:
        socket_.settimeout(settings.request_read_timeout_seconds)
        with pytest.raises(OverflowError):  # (what a larger one did)
            socket_.settimeout(1e10)
