"""Gateway throughput and latency with the services reached over gRPC against over HTTP: two
gateway instances on one stack, differing only in GATEWAY_UPSTREAM_TRANSPORT, driven in turns.

`make bench` reports it as one section; `python -m bench.gateway_transports` runs it alone, on a
stack of its own, and writes a small report of its own to bench/results/.
"""

from __future__ import annotations

# Run as a command: Ctrl-C while the modules below load ends it quietly (shared.quiet_interrupt).
if __name__ == "__main__":
    from shared.quiet_interrupt import quiet_while_loading
    quiet_while_loading()

import argparse
import uuid
from dataclasses import dataclass
from pathlib import Path

import requests

from bench.load import ORDER_BODY, LoadSpec, offer_load
from bench.plan import FULL, SMOKE, BenchPlan
from bench.report import RESULTS_DIR, describe_run, write_gateway_transports_report
from bench.servers import server_versions
from bench.shop import RUN_ID, running_bench_stack, say, wait_until_final
from bench.stats import latency_summary_ms
from devstack.processes import ManagedProcess
from devstack.stack import Stack

TRANSPORTS = ("grpc", "http")
# The per-user limit (300 a minute by default) would cap the throughput instead of measuring it.
UNLIMITED_RATE_PER_MINUTE = "100000000"
# Each turn is warmed first, unmeasured, through its gateway at its endpoint: the gateway's first
# requests to a service open its connections (over HTTP, one per thread; over gRPC, the channel),
# and a connection the turn before left idle (the other transport's turn, the drain) may be at
# the service's keep-alive's end (2 s) as the turn begins.
WARMUP_SECONDS = 0.5


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str
    body: str | None
    status: int
    # Whether the callers hold an account. Orders are placed by shoppers without one: the gateway
    # and the orders service do the same for them as for any order, and the payments side cancels
    # each at once (NO_ACCOUNT) instead of debiting it: the pipeline behind the turns stays light.
    callers_hold_accounts: bool


ENDPOINTS = (
    Endpoint("balance", "GET", "/api/accounts/balance", None, 200, callers_hold_accounts=True),
    Endpoint("order", "POST", "/api/orders", ORDER_BODY, 202, callers_hold_accounts=False),
)


def measure_gateway_transports(stack: Stack, plan: BenchPlan, workdir: Path) -> dict:
    """Each endpoint driven closed-loop through each transport's gateway, the transports taking
    turns (gRPC, HTTP, gRPC, ...) so that drift over the run falls on both alike.

    Both gateways are started here, alike but for the transport (and a rate limit too high to
    bite), so the comparison holds on any started stack, the tests' included."""
    gateways: list[ManagedProcess] = []
    try:
        urls = {transport: start_gateway(stack, transport, gateways) for transport in TRANSPORTS}
        loads, drained = _take_turns(stack, plan, urls, workdir)
    finally:
        for process in gateways:
            process.stop()
    endpoints = {}
    for endpoint in ENDPOINTS:
        by_transport = {transport: _summary(loads[endpoint.name, transport])
                        for transport in TRANSPORTS}
        http_rate = by_transport["http"]["requests_per_s"]
        endpoints[endpoint.name] = {
            "method": endpoint.method,
            "path": endpoint.path,
            **by_transport,
            "grpc_over_http": round(by_transport["grpc"]["requests_per_s"] / http_rate, 3)
            if http_rate else None,
        }
    return {
        "shoppers": plan.gateway_shoppers,
        "concurrency": plan.gateway_concurrency,
        "seconds_per_turn": plan.gateway_seconds,
        "rounds": plan.gateway_rounds,
        "endpoints": endpoints,
        "orders_drained": drained,
    }


def _take_turns(stack: Stack, plan: BenchPlan, urls: dict[str, str], workdir: Path
                ) -> tuple[dict[tuple[str, str], list[dict]], bool]:
    """The generator's report of every turn, by (endpoint, transport), and whether every order
    placed reached a final status."""
    gateway_urls = list(urls.values())
    callers = {True: sign_up_shoppers(gateway_urls, plan.gateway_shoppers, balance="1000000"),
               False: sign_up_shoppers(gateway_urls, plan.gateway_shoppers, balance=None)}
    loads: dict[tuple[str, str], list[dict]] = {}
    drained = True
    for round_number in range(1, plan.gateway_rounds + 1):
        for endpoint in ENDPOINTS:
            for transport, url in urls.items():
                turn = f"{endpoint.name}-{transport}-{round_number}"
                shoppers = callers[endpoint.callers_hold_accounts]
                warmup = _drive(url, endpoint, shoppers, WARMUP_SECONDS,
                                plan.gateway_concurrency, workdir / f"gateway-warmup-{turn}.json")
                load = _drive(url, endpoint, shoppers, plan.gateway_seconds,
                              plan.gateway_concurrency, workdir / f"gateway-{turn}.json")
                loads.setdefault((endpoint.name, transport), []).append(load)
                # Orders still settling would load the machine during the next turn.
                placed = warmup["order_ids"] + load["order_ids"]
                if placed:
                    drained &= wait_until_final(stack, placed, plan.drain_timeout)
    return loads, drained


def start_gateway(stack: Stack, transport: str, started: list[ManagedProcess]) -> str:
    """Start one more gateway, served as the stack's is, calling the services over `transport`;
    return its URL once it reports healthy, with its process added to `started` for the caller
    to stop."""
    process, url = stack.start_gateway_instance(f"gateway-{transport}", {
        "GATEWAY_UPSTREAM_TRANSPORT": transport,
        "RATE_LIMIT_PER_MINUTE": UNLIMITED_RATE_PER_MINUTE,
    })
    started.append(process)
    return url


def sign_up_shoppers(gateway_urls: list[str], count: int, balance: str | None) -> list[str]:
    """Access tokens of new users, each with an account holding `balance` (none when None);
    they sign up through the gateways in turn."""
    tokens = []
    with requests.Session() as http:
        for n in range(count):
            url = gateway_urls[n % len(gateway_urls)]
            response = http.post(f"{url}/api/auth/register", timeout=10, json={
                "username": f"bench-{RUN_ID}-{uuid.uuid4().hex[:6]}-{n}",
                "password": "a bench password"})
            response.raise_for_status()
            token = response.json()["access_token"]
            if balance is not None:
                auth = {"Authorization": f"Bearer {token}"}
                http.post(f"{url}/api/accounts", headers=auth, timeout=10).raise_for_status()
                http.post(f"{url}/api/accounts/deposit", headers=auth, json={"amount": balance},
                          timeout=10).raise_for_status()
            tokens.append(token)
    return tokens


def _drive(url: str, endpoint: Endpoint, tokens: list[str], seconds: float, concurrency: int,
           out: Path) -> dict:
    return offer_load(LoadSpec(url=f"{url}{endpoint.path}", users=tokens, duration=seconds,
                               concurrency=concurrency, method=endpoint.method,
                               body=endpoint.body, auth="bearer", expect_status=endpoint.status),
                      out)


def _summary(loads: list[dict]) -> dict:
    """One transport's turns at one endpoint, taken together."""
    seconds = sum(load["duration_s"] for load in loads)
    generator_cpu_s = sum(load["generator_cpu_s"] for load in loads)
    return {
        "requests": sum(load["requests"] for load in loads),
        "requests_per_s": round(sum(load["accepted"] for load in loads) / seconds, 1),
        "per_turn_per_s": [load["accepted_per_s"] for load in loads],
        **latency_summary_ms([ms / 1000 for load in loads for ms in load["http_latency_ms"]]),
        "errors": sum(load["failed"] for load in loads),
        "error_kinds": sorted({kind for load in loads for kind in load["errors"]}),
        "generator_cpu_percent": round(100 * generator_cpu_s / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_transports",
                                     description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny loads, a second each")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    with running_bench_stack(say) as stack:
        results = describe_run(plan, server_versions(stack))
        workdir = stack.run_dir / "load"
        workdir.mkdir(parents=True, exist_ok=True)
        say("gateway over gRPC against HTTP...")
        results["gateway_transports"] = measure_gateway_transports(stack, plan, workdir)
    paths = write_gateway_transports_report(results, RESULTS_DIR)
    print(paths[1].read_text())
    say(f"wrote {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    from shared.quiet_interrupt import run_main
    run_main(main)
