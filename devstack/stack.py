"""The whole local shop as one object: infrastructure, migrations, APIs, workers, beat, Flower."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import requests

from devstack import infra
from devstack.database_claim import DatabaseClaim
from devstack.leftovers import RUN_RECORD, RunRecord
from devstack.local_secrets import write_owner_only
from devstack.logs import keep_the_previous_log
from devstack.postgres_data import sweep_postgres_data_left
from devstack.processes import ManagedProcess, ProcessGroup
from devstack.run_settings import DEFAULT_NAMES_PREFIX, PORT_SETTINGS
# Each has its own database, web app and Celery worker (with its Kafka consumer).
from shared.config import ENVIRONMENT, GRPC_SERVICES, SERVICES
from shared.migrations import GIVE_WAY_FOR_SECONDS
from shared.task_queues import worker_queues

REPO_ROOT = Path(__file__).resolve().parent.parent
FLOWER_CONFIG = REPO_ROOT / "flowerconfig.py"
DEFAULT_PORTS = {"gateway": 8000, "orders": 8001, "payments": 8002, "broker": 9092,
                 "flower": 5555, "orders-grpc": 50051, "payments-grpc": 50052}
# The gateway holds one thread per open WebSocket (up to gateway_app.notifications'
# SOCKETS_PER_PROCESS), and 8 more for HTTP.
GATEWAY_THREADS = 200
# gunicorn's worker processes and threads per API (the benchmark serves its baseline the same way).
API_WORKERS = 2
API_THREADS = 4
GUNICORN_WORKER_CLASS = "shared.gunicorn_worker.JsonErrorsThreadWorker"
# How long a service's migrations may run: a revision held up by another session's lock keeps
# trying for GIVE_WAY_FOR_SECONDS, and its log says why.
MIGRATIONS_TIMEOUT_SECONDS = GIVE_WAY_FOR_SECONDS + 60
# Threads of each Celery worker's pool. A batch spends most of its time waiting (on PostgreSQL, on
# row locks another batch holds, on a core), so more threads than cores keep batches from queueing
# behind each other; each holds one pooled connection while it runs (shared/db.py pools 20).
WORKER_THREADS = 16
# The settings naming a server, or a namespace on one, the stack has no value of its own for: its
# processes get each one's default (_build_env) whatever the environment holds, so that one
# exported in the developer's shell (another checkout's `.run/env`, a deployment's env file) sends
# none of the run's tasks, cache entries or records elsewhere: a CELERY_BROKER_URL passed on had
# the run's tasks queued in another run's Redis, under the same prefix, for that run's workers to
# take (or in one long gone), orders left NEW with nothing said. CELERY_BROKER_URL and
# CACHE_REDIS_URL empty: REDIS_URL's, the stack's.
NAMES_OF_ITS_OWN = ("CELERY_BROKER_URL", "CACHE_REDIS_URL", "REDIS_KEY_PREFIX",
                    "KAFKA_CONSUMER_GROUP_PREFIX", "TOPIC_PAYMENT_REQUESTED",
                    "TOPIC_PAYMENT_RESULTS", "TOPIC_ORDER_STATUS_CHANGED", "OUTBOX_EXTRA_TOPICS")
# Celery's own variables naming a server or its configuration, which it takes before its
# configuration (celeryconfig's broker_url): given empty, as if unset. Its command's (`celery -A
# tasks worker`, beat, Flower) too: BROKER_URL is its --broker's, which it then sets as
# CELERY_BROKER_URL (a BROKER_URL exported for another project had the workers take their tasks
# from that project's Redis, while the APIs sent them to the run's).
CELERY_SERVERS_FROM_THE_ENVIRONMENT = ("CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL",
                                       "CELERY_RESULT_BACKEND", "BROKER_URL", "RESULT_BACKEND",
                                       "LOADER", "CONFIG_MODULE")
# The first of the processes that take requests to start, and so the last of them stopped: once
# it is, the run lets the orders in flight settle before it stops the workers
# (Stack._let_orders_in_flight_settle), for at most SETTLE_SECONDS, done once nothing has been in
# flight for SETTLE_QUIET_SECONDS: the last hop of an order's (a relay's record read, stored in
# its inbox and committed; handled, its own outbox row written) shows as in flight all the way,
# but a quiet window covers a step the counts may miss between two looks.
FIRST_INTAKE = "orders-grpc"
SETTLE_SECONDS = 15
SETTLE_QUIET_SECONDS = 2.0
# The drain's own connections: a lock held, a database slow, cost a look, not the whole stop.
SETTLE_CONNECT_TIMEOUT_SECONDS = 2
SETTLE_QUERY_LIMITS = "-c statement_timeout=1000 -c lock_timeout=500"


def gunicorn_argv(port: int, app: str, threads: int = API_THREADS,
                  workers: int = API_WORKERS) -> list[str]:
    """The `python -m` arguments that serve the WSGI app `app` as both APIs are served."""
    # --no-control-socket: otherwise every gunicorn master shares ~/.gunicorn/gunicorn.ctl. No
    # access log: the apps log each request themselves, with its request id
    # (shared/request_context.py). The worker class answers what gunicorn cannot read in JSON.
    return [
        *f"gunicorn -b {infra.LOCALHOST}:{port} -w {workers} --threads {threads}".split(),
        "-k", GUNICORN_WORKER_CLASS,
        "--no-control-socket",
        app,
    ]


def flower_argv(port: int) -> list[str]:
    """The `python -m` arguments that run Flower, given its configuration file by its absolute
    path: by default Flower reads flowerconfig.py from its working directory, and goes on without
    it, unsaid, when it is not there (a file named by --conf must be there)."""
    return [*"celery -A tasks flower".split(), f"--conf={FLOWER_CONFIG}", f"--port={port}",
            f"--address={infra.LOCALHOST}"]


class Stack:
    """Starts every process of the shop, passes them one environment, and stops them all again.

    Values in env_overrides may contain "{postgres}" and "{redis}", replaced by the URL bases
    found or started at start(), e.g. {"ORDERS_DATABASE_URL": "{postgres}/test_orders_1a2b"} or
    {"REDIS_URL": "{redis}/5"}. A caller that runs PostgreSQL and Redis itself (the tests) passes
    their URL bases as `servers`: none is looked for or started then. With `own_redis`, the stack
    runs a Redis of its own all the same, on a free port, in place of `servers`' or the machine's
    (one the chaos soak may kill: its processes' own, no other run's); `own_redis_url` names it.
    So, with `own_postgres`, a PostgreSQL of its own (the embedded one, its data in a folder of
    run_dir of the stack's alone, `own_postgres_dir`: never one another run's server runs on,
    such as the run_dir/postgres ensure_postgres's embedded server takes up) holding every
    service's database; `own_postgres_url` names it. Such a stack, as it starts, deletes the
    folders of that kind a run killed outright left, no server running on them
    (devstack.postgres_data).

    With `names_prefix` (`make run`'s), the stack names its databases <prefix>_orders,
    <prefix>_payments and <prefix>_gateway, and its Redis keys <prefix>..., and claims those
    names on its PostgreSQL for as long as it runs (devstack.database_claim), refusing to start
    where another run holds them; without one, the settings' defaults, unclaimed (a test's stack
    names databases of its own in env_overrides).

    A stack `data_thrown_away` (the benchmark's: its databases dropped once it stops) stops
    without waiting for the orders in flight to settle (_let_orders_in_flight_settle): there is
    no order of it left to keep.

    `on_servers`, if given, is called with PostgreSQL's and Redis's URL bases once they are found
    or started, before anything of the run's is made on them (its databases, its keys).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        env_overrides: Mapping[str, str] | None = None,
        ports: Mapping[str, int] | None = None,
        with_flower: bool = False,
        quiet: bool = True,
        servers: tuple[str, str] | None = None,
        own_redis: bool = False,
        own_postgres: bool = False,
        names_prefix: str | None = None,
        on_servers: Callable[[str, str], None] | None = None,
        data_thrown_away: bool = False,
    ):
        self.run_dir = Path(run_dir).resolve()
        self.env_overrides = dict(env_overrides or {})
        self.servers = servers  # (PostgreSQL's URL base, Redis's), when given
        self.own_redis = own_redis
        self.own_redis_url: str | None = None  # (its URL base, once started)
        self.own_postgres = own_postgres
        self.own_postgres_url: str | None = None  # (its URL base, once started)
        self.own_postgres_dir: Path | None = (
            self.run_dir / f"postgres-{uuid.uuid4().hex[:8]}" if own_postgres else None)
        self.ports = {**DEFAULT_PORTS, **(ports or {})}
        self.names_prefix = names_prefix
        self._claim: DatabaseClaim | None = None
        self.with_flower = with_flower
        self.quiet = quiet
        self.on_servers = on_servers
        self.data_thrown_away = data_thrown_away
        self._group: ProcessGroup | None = None
        self._broker: ManagedProcess | None = None
        self._servers_started: list[ManagedProcess] = []  # (PostgreSQL's, Redis's: _adopt)
        self._env: dict[str, str] | None = None

    # --- what tests and the CLI read --------------------------------------------------------------

    @property
    def logs_dir(self) -> Path:
        return infra.logs_dir(self.run_dir)

    @property
    def gateway_url(self) -> str:
        return self._url("gateway")

    @property
    def orders_url(self) -> str:
        return self._url("orders")

    @property
    def payments_url(self) -> str:
        return self._url("payments")

    @property
    def flower_url(self) -> str | None:
        return self._url("flower") if self.with_flower else None

    @property
    def broker_address(self) -> str:
        return f"{infra.LOCALHOST}:{self.ports['broker']}"

    def grpc_address(self, service: str) -> str:
        """Where `service` (one of GRPC_SERVICES) serves gRPC."""
        return f"{infra.LOCALHOST}:{self.ports[f'{service}-grpc']}"

    @property
    def env(self) -> dict[str, str]:
        """The configuration every process of the stack gets (on top of os.environ)."""
        if self._env is None:
            raise RuntimeError("Stack.env is known only after start()")
        return dict(self._env)

    def write_env_file(self, path: str | os.PathLike) -> Path:
        """Write `env` as shell assignments, for a tool run beside the stack (`set -a; . <path>;
        set +a`, then `python -m tasks.parked ...`): the stack may run embedded servers on ports
        of its own, which the settings' defaults do not name. Readable by its owner only: the
        settings may hold the secrets (`make run`'s own: devstack.local_secrets)."""
        return write_owner_only(path, "".join(f"{name}={shlex.quote(value)}\n"
                                              for name, value in sorted(self.env.items())))

    @property
    def processes(self) -> list[ManagedProcess]:
        return self._group.processes if self._group is not None else []

    @property
    def claim(self) -> DatabaseClaim | None:
        """The run's claim on its databases (names_prefix's), once started, where it took one."""
        return self._claim

    @property
    def holding_data(self) -> list[ManagedProcess]:
        """The processes the run's data is in: the broker, and the PostgreSQL and Redis the stack
        started (none of the machine's)."""
        return [*([self._broker] if self._broker is not None else []), *self._servers_started]

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> Stack:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        record = RunRecord(self.run_dir / RUN_RECORD)
        left = record.begin()
        if left:
            print(f"[devstack] stopped what a run killed before left running in {self.run_dir}:"
                  f" {', '.join(left)}", file=sys.stderr, flush=True)
        self._group = ProcessGroup(record=record, on_signal=self._say_stopping)
        try:
            if self.own_postgres:
                for line in sweep_postgres_data_left(self.run_dir, infra.LOCALHOST):
                    print(f"[devstack] {line}", file=sys.stderr, flush=True)
            self._check_ports_free()
            postgres_base, redis_base = self._find_or_start_servers()
            self._claim_names(postgres_base)
            if self.on_servers is not None:
                self.on_servers(postgres_base, redis_base)
            self._say_if_postgres_is_short_of_connections(postgres_base)
            self._say("broker...")
            self._broker = self._group.add(infra.broker_process(self.ports["broker"], self.run_dir))
            infra.start_and_wait_for_broker(self._broker, self.ports["broker"])
            self._env = self._build_env(postgres_base, redis_base)
            for service in SERVICES:
                self._say(f"migrations for {service}...")
                self._migrate(service)
            for process in self._app_processes():
                self._say(f"{process.name}...")
                self._group.start(process)
            self.wait_healthy(timeout)
            # Only a shop that came up can have orders in flight: a start that failed (a service
            # never healthy) stops at once, with no drain to wait out.
            self._arrange_the_drain()
        except BaseException:
            self.stop()
            raise
        self._say("ready.")
        return self

    def stop(self) -> None:
        try:
            if self._group is not None:
                self._group.stop_all()
        finally:  # (held until every process is stopped: the drain's writes are the run's too)
            if self._claim is not None:
                self._claim.release()
                self._claim = None

    def _claim_names(self, postgres_base: str) -> None:
        """Claim the names_prefix's databases on the PostgreSQL at `postgres_base`, if given."""
        if self.names_prefix is not None:
            self._claim = DatabaseClaim.take(
                postgres_base, self.names_prefix,
                [f"{self.names_prefix}_{service}" for service in SERVICES], REPO_ROOT)

    def _arrange_the_drain(self) -> None:
        """Have the stop wait for the orders in flight once the processes that take requests have
        stopped, before the workers (_let_orders_in_flight_settle); not for a stack whose data is
        thrown away."""
        if self.data_thrown_away:
            return
        for process in self._group.processes:
            if process.name == FIRST_INTAKE:
                self._group.when_stopped(process, self._let_orders_in_flight_settle)

    def _say_stopping(self) -> None:
        """Said as Ctrl-C (SIGTERM, a hangup) comes, before the stop it starts, not once it is
        done (the drain may take seconds), quiet or not: a quiet stack (the benchmark's) said
        nothing while it stopped, for seconds. On stderr, as _say, stdout being the log
        follower's; a print from a signal handler may raise all the same (stderr a pipe whose
        reader is gone, a terminal closed, a write to stderr the signal cut short: reentrant
        call), which ProcessGroup takes so that the stop still happens."""
        print("\n[devstack] stopping...", file=sys.stderr, flush=True)

    def _find_or_start_servers(self) -> tuple[str, str]:
        """PostgreSQL's and Redis's URL bases: `servers`', or the machine's own, or embedded ones
        started (and stopped with the stack); one started for the stack with `own_postgres`, and
        `own_redis`."""
        if self.servers is not None:
            postgres_base, redis_base = self.servers
        if self.own_postgres:
            self._say("a PostgreSQL of its own...")
            postgres_base, postgres = infra.start_embedded_postgres(
                self.run_dir, infra.free_port(), on_start=self._group.note,
                data_dir=self.own_postgres_dir.name)
            if postgres is None:  # (one runs on its data directory: not the stack's to restart)
                raise RuntimeError(f"a PostgreSQL already runs on {self.own_postgres_dir}")
            self._adopt(postgres)
            self.own_postgres_url = postgres_base
        elif self.servers is None:
            self._say("PostgreSQL...")
            postgres_base, postgres = infra.ensure_postgres(self.run_dir,
                                                            on_start=self._group.note)
            self._adopt(postgres)
        if self.own_redis:
            self._say("a Redis of its own...")
            redis_base, redis = infra.start_embedded_redis(self.run_dir, infra.free_port(),
                                                           on_start=self._group.note)
            self._adopt(redis)
            self.own_redis_url = redis_base
        elif self.servers is None:
            self._say("Redis...")
            redis_base, redis = infra.ensure_redis(self.run_dir, on_start=self._group.note)
            self._adopt(redis)
        return postgres_base, redis_base

    def start_extra(self, process: ManagedProcess) -> ManagedProcess:
        """Start one more process as the stack's own: recorded, and stopped with the rest."""
        if self._group is None:
            raise RuntimeError("the stack has not been started")
        return self._group.start(process)

    def start_again(self, process: ManagedProcess,
                    before_start: Callable[[], None] | None = None) -> bool:
        """Start one of the stack's processes again, unless the stack is stopping (False);
        `before_start` run just before, once it is known not to be (ProcessGroup.start_again)."""
        return self._group is not None and self._group.start_again(process, before_start)

    def stop_broker(self) -> None:
        self._require_started().stop()

    def start_broker(self) -> None:
        """Start the broker again on the same port; it stores in memory, so it comes back empty."""
        infra.start_and_wait_for_broker(self._require_started(), self.ports["broker"])

    def start_gateway_instance(self, name: str, env_overrides: dict[str, str] | None = None
                               ) -> tuple[ManagedProcess, str]:
        """One more gateway on a free port, served as the stack's own and sharing its databases,
        Redis and broker (as a deployment scaled out runs several). Returns the process and its
        URL once GET /health answers 200; the caller stops it (it is stopped here if it never
        gets healthy). Started as start_extra starts one: in the run's record, so that a run
        killed outright (SIGKILL, the OOM killer) has it stopped by the next, not left holding
        its database connections for good, and stopped with the stack at the latest."""
        port = infra.free_port()
        argv = gunicorn_argv(port, "gateway_app:create_app()", threads=GATEWAY_THREADS)
        process = self.start_extra(ManagedProcess(
            name, [sys.executable, "-m", *argv], {**self._process_env(), **(env_overrides or {})},
            self.logs_dir / f"{name}.log", REPO_ROOT))
        url = f"http://{infra.LOCALHOST}:{port}"

        def healthy() -> bool:
            try:
                return requests.get(f"{url}/health", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        try:
            infra.wait_for_process(process, healthy, 30, f"the {name} instance")
        except BaseException:
            process.stop()
            raise
        return process, url

    def wait_healthy(self, timeout: float = 60) -> None:
        """Wait for GET /health to answer 200 on every API and for the gRPC ports to listen; fail
        at once if any process has died."""
        pending = {service: f"{self._url(service)}/health" for service in SERVICES}
        last_answer: dict[str, str] = {}

        def all_healthy() -> bool:
            self._fail_if_any_died()
            for service, url in list(pending.items()):
                try:
                    response = requests.get(url, timeout=2)
                    last_answer[service] = f"{response.status_code} {response.text[:300]}"
                    if response.status_code == 200:
                        del pending[service]
                except requests.RequestException as exc:
                    last_answer[service] = repr(exc)
            for service in GRPC_SERVICES:
                if not infra.port_open(infra.LOCALHOST, self.ports[f"{service}-grpc"]):
                    last_answer[f"{service}-grpc"] = "not listening yet"
                    return False
            return not pending

        try:
            infra.wait_until(all_healthy, timeout, interval=0.25, what="the APIs to report healthy")
        except TimeoutError as exc:
            details = "\n".join(f"  {service}: {last_answer.get(service)}" for service in pending)
            raise TimeoutError(f"{exc}; not healthy:\n{details}") from exc

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # --- pieces -----------------------------------------------------------------------------------

    def _build_env(self, postgres_base: str, redis_base: str) -> dict[str, str]:
        prefix = self.names_prefix or DEFAULT_NAMES_PREFIX
        env = {
            **{f"{service.upper()}_DATABASE_URL": f"{postgres_base}/{prefix}_{service}"
               for service in SERVICES},
            "ORDERS_SERVICE_URL": self._url("orders"),
            "PAYMENTS_SERVICE_URL": self._url("payments"),
            "REDIS_URL": f"{redis_base}/0",
            "KAFKA_BOOTSTRAP_SERVERS": self.broker_address,
            **{name: ENVIRONMENT[name] for name in NAMES_OF_ITS_OWN},
            **dict.fromkeys(CELERY_SERVERS_FROM_THE_ENVIRONMENT, ""),
        }
        if self.names_prefix is not None:
            env["REDIS_KEY_PREFIX"] = self.names_prefix
        for service in GRPC_SERVICES:
            address = self.grpc_address(service)
            env[f"{service.upper()}_GRPC_BIND"] = env[f"{service.upper()}_GRPC_TARGET"] = address
        for name, value in self.env_overrides.items():
            env[name] = (
                str(value).replace("{postgres}", postgres_base).replace("{redis}", redis_base)
            )
        return env

    def _process_env(self) -> dict[str, str]:
        # Unbuffered, so the log files (and `make run`'s terminal) show lines as they are written.
        return {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}

    def _migrate(self, service: str) -> None:
        log_path = self.logs_dir / f"migrate-{service}.log"
        keep_the_previous_log(log_path)
        with open(log_path, "wb") as log:
            try:
                result = subprocess.run(
                    [sys.executable, "-m", "shared.migrations", "upgrade", service],
                    cwd=REPO_ROOT,
                    env=self._process_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=MIGRATIONS_TIMEOUT_SECONDS,
                )
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"migrations for {service} did not finish in {MIGRATIONS_TIMEOUT_SECONDS:.0f}"
                    f" s; {log_path}:\n{log_path.read_text()}") from None
        if result.returncode != 0:
            raise RuntimeError(
                f"migrations for {service} exited with code {result.returncode}; "
                f"{log_path}:\n{log_path.read_text()}"
            )
        # (A database a later release migrated, say: the shop starts, and should not silently.)
        for line in log_path.read_text().splitlines():
            if line.startswith("WARNING"):
                self._say(f"migrations for {service}: {line}")

    def connections_needed(self) -> int:
        """The most connections the shop's processes hold on PostgreSQL at once (their pools'
        and workers' settings: shared.db_connections)."""
        from shared.db_connections import most_connections  # (here: it loads gRPC, for a start)

        return sum(most_connections(argv) for argv in self._app_commands().values())

    def _say_if_postgres_is_short_of_connections(self, postgres_base: str) -> None:
        """Warn when the PostgreSQL at `postgres_base` has fewer connections free than the shop's
        processes can hold at once: past them it refuses one mid-run ("too many clients"), to
        whichever process asks. Not refused: a stock PostgreSQL's 100 are fewer than the shop can
        hold, yet enough for a developer's load (README: The two commands)."""
        slots = infra.connection_slots(postgres_base)
        if slots is None:  # (none the shop can use: the migrations say why)
            return
        needed = self.connections_needed()
        if needed > slots.free:
            enough = needed + slots.reserved + slots.in_use
            self._say(f"PostgreSQL at {postgres_base} may refuse the shop's connections mid-run"
                      f" (\"too many clients\"): its processes can hold {needed}, and"
                      f" {slots.free} are free (max_connections {slots.most}, {slots.reserved}"
                      f" reserved, {slots.in_use} in use); raise max_connections to {enough} or"
                      f" more (ALTER SYSTEM SET max_connections = {enough}; then restart"
                      " PostgreSQL)")

    def _app_commands(self) -> dict[str, list[str]]:
        """The `python -m` arguments of the shop's processes, by name, in the order they start:
        those that take requests last, so that they are stopped first (ProcessGroup.stop_all),
        before the workers."""
        commands = {}
        for service in SERVICES:
            commands[f"{service}-worker"] = [
                *f"celery -A tasks worker -Q {worker_queues(service)} -n {service}@%h".split(),
                *f"-P threads -c {WORKER_THREADS}".split(),
                *f"--consume {service} --without-gossip --without-mingle -l INFO".split(),
            ]
        commands["beat"] = [
            *"celery -A tasks beat -l WARNING -s".split(),
            str(self.run_dir / "celerybeat-schedule"),
        ]
        if self.with_flower:
            commands["flower"] = flower_argv(self.ports["flower"])
        for service in GRPC_SERVICES:
            commands[f"{service}-grpc"] = ["shared.grpc_server", service]
        for service in SERVICES:
            commands[f"{service}-api"] = gunicorn_argv(
                self.ports[service], f"{service}_app:create_app()",
                threads=GATEWAY_THREADS if service == "gateway" else API_THREADS,
            )
        return commands

    def _app_processes(self) -> list[ManagedProcess]:
        """The shop's processes (_app_commands), in the order they start."""
        env = self._process_env()
        return [
            ManagedProcess(
                name, [sys.executable, "-m", *argv], env, self.logs_dir / f"{name}.log", REPO_ROOT
            )
            for name, argv in self._app_commands().items()
        ]

    def _check_ports_free(self) -> None:
        names = [*SERVICES, *(f"{s}-grpc" for s in GRPC_SERVICES), "broker"] + (
            ["flower"] if self.with_flower else [])
        taken = [name for name in names if infra.port_open(infra.LOCALHOST, self.ports[name])]
        if taken:
            # Whatever listens there would answer our health checks in our processes' place.
            in_use = ", ".join(f"{name} ({self.ports[name]})" for name in taken)
            raise RuntimeError(
                f"ports already in use: {in_use}; is another stack running? To run beside it,"
                f" set others: {', '.join(PORT_SETTINGS[name] for name in taken)} (README: The"
                f" two commands)")

    def _fail_if_any_died(self) -> None:
        for process in self.processes:
            if process.died():
                raise RuntimeError(
                    f"{process.name} exited with code {process.returncode}; "
                    f"last lines of {process.log_path}:\n{process.log_tail()}"
                )

    def _adopt(self, process: ManagedProcess | None) -> None:
        if process is not None:
            self._group.add(process)
            self._servers_started.append(process)

    def _require_started(self) -> ManagedProcess:
        if self._broker is None:
            raise RuntimeError("the stack has not been started")
        return self._broker

    def _url(self, name: str) -> str:
        return f"http://{infra.LOCALHOST}:{self.ports[name]}"

    def _let_orders_in_flight_settle(self) -> None:
        """Once nothing takes requests any more, wait (up to SETTLE_SECONDS) until no message is
        in flight, for SETTLE_QUIET_SECONDS on end: no record in the broker that its consumer
        group has not committed (stored in its inbox), no outbox row the relay may send and no
        inbox row due to be handled (_in_flight). The broker keeps what it holds in memory only:
        stopped with an order's messages still in it, the run would lose them, the order left NEW
        for good, or paid without its notification."""
        workers = [p for p in self._group.processes if p.name.endswith("-worker")]
        if not workers:
            return
        needed = [*workers, *([self._broker] if self._broker is not None else [])]
        gone = [process.name for process in needed if not process.alive()]
        if gone:
            self._say(f"not waiting for the orders in flight: {', '.join(gone)} not running"
                      " (what the broker still holds is lost)")
            return
        import psycopg2  # (as devstack.infra: only a stop that waits needs it)

        from shared.db import driver_dsn

        self._say("waiting for the orders in flight to settle (Ctrl-C again skips this wait,"
                  " losing them)...")
        deadline = time.monotonic() + SETTLE_SECONDS
        quiet_since = None
        in_flight = error = None
        with contextlib.ExitStack() as stack:
            try:
                connections = [stack.enter_context(contextlib.closing(psycopg2.connect(
                    driver_dsn(self._env[f"{service.upper()}_DATABASE_URL"]),
                    connect_timeout=SETTLE_CONNECT_TIMEOUT_SECONDS, options=SETTLE_QUERY_LIMITS)))
                    for service in SERVICES]
            except psycopg2.Error as exc:
                self._say(f"could not wait for the orders in flight: {exc}".strip())
                return
            for connection in connections:
                connection.autocommit = True
            consumed = self._consumed_topics()
            while time.monotonic() < deadline:
                try:
                    in_flight, error = self._in_flight(connections, consumed, deadline), None
                except Exception as exc:  # (psycopg2's, confluent-kafka's: counted again)
                    in_flight, error = None, exc
                    if any(connection.closed for connection in connections):
                        self._say(f"could not wait for the orders in flight: {exc}".strip())
                        return
                now = time.monotonic()
                if in_flight != 0:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= SETTLE_QUIET_SECONDS:
                    self._say("nothing left in flight")
                    return
                time.sleep(0.1)
        if in_flight is None:
            self._say(f"stopping after {SETTLE_SECONDS} s, not knowing what is still in flight"
                      f" ({error or 'the broker did not answer in time'})")
        elif in_flight:
            self._say(f"stopping with {in_flight} message(s) still in flight after"
                      f" {SETTLE_SECONDS} s")
        else:
            self._say(f"stopping after {SETTLE_SECONDS} s, nothing in flight but for less than"
                      f" {SETTLE_QUIET_SECONDS} s on end")

    def _consumed_topics(self) -> dict[str, list[str]]:
        """The consumer groups the run's workers consume in, each with its topics."""
        from shared.config import load_settings
        from tasks.services import service_package

        settings = load_settings(self._process_env())
        return {settings.consumer_group(service):
                service_package(service).subscribed_topics(settings) for service in SERVICES}

    def _in_flight(self, connections, consumed: dict[str, list[str]],
                   deadline: float) -> int | None:
        """The messages in flight: the outbox rows that may be sent and the inbox rows due to be
        handled of every service's database, and the records the broker holds that their group
        has not committed (None if they could not be counted by the `deadline`)."""
        from shared.inbox.handling import count_messages_due
        from shared.kafka import records_unread_by
        from shared.outbox.relaying import count_rows_that_may_go

        in_flight = 0
        for connection in connections:
            with connection.cursor() as cursor:
                in_flight += count_rows_that_may_go(cursor) + count_messages_due(cursor)
        for group, topics in consumed.items():
            unread = records_unread_by(self.broker_address, group, topics,
                                       timeout=min(2.0, max(deadline - time.monotonic(), 0.1)))
            if unread is None:
                return None
            in_flight += unread
        return in_flight

    def _say(self, message: str) -> None:
        """Say `message` on stderr, unless quiet. A line that cannot be said (stderr a pipe whose
        reader is gone, `make run 2>&1 | tee` stopped by the same Ctrl-C; a terminal closed) is
        dropped: said by the drain as the stack stops, its error stopped the stack at once, the
        messages in flight lost with the broker, and ended the run in a traceback."""
        if self.quiet:
            return
        try:
            print(f"[devstack] {message}", file=sys.stderr, flush=True)
        except OSError:
            pass

