"""The load generator: a separate process that sends one kind of request (POST an order by default)
at an offered rate (or as fast as it can) and reports what it got, including the CPU it used
itself, so its cost is never hidden. It calls a service as the gateway does (signing each user id)
or the gateway as a browser does (one bearer token per user).

Run by `offer_load()`; the child writes its result as JSON to the file named by --out.
"""

from __future__ import annotations

# Run as a command: Ctrl-C while the modules below load ends it quietly (shared.quiet_interrupt).
if __name__ == "__main__":
    from shared.quiet_interrupt import quiet_while_loading
    quiet_while_loading()

import argparse
import http.client
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.memory import peak_rss_bytes
from bench.stats import latency_summary_ms
from shared.caller_deadline import deadline_headers
from shared.config import load_settings
from shared.internal_auth import identity_headers

ORDER_BODY = json.dumps({"amount": "1.00", "description": "bench"})
# How `LoadSpec.users` identify the caller: user ids signed as the gateway signs them (to call a
# service directly), or access tokens sent as `Authorization: Bearer` (to call the gateway).
AUTH_SCHEMES = ("signed", "bearer")


@dataclass(frozen=True)
class LoadSpec:
    """What to offer: `rate` requests/s for `duration` s, or as fast as possible when rate is None.
    A request counts as accepted when it gets `expect_status`."""

    url: str  # the target, e.g. http://127.0.0.1:8001/orders
    users: list[str]  # user ids, or access tokens when auth is "bearer"
    duration: float
    rate: float | None = None
    concurrency: int = 16
    method: str = "POST"
    body: str | None = ORDER_BODY  # JSON, or None to send no body
    auth: str = "signed"
    expect_status: int = 202


def offer_load(spec: LoadSpec, out: Path, stack_env: Mapping[str, str] | None = None) -> dict:
    """Run the generator in its own process and return its report. Sending as the gateway (not
    with bearer tokens), it signs with the secret the services check: `stack_env`'s."""
    argv = [sys.executable, "-m", "bench.load", "--url", spec.url, "--users", ",".join(spec.users),
            "--duration", str(spec.duration), "--concurrency", str(spec.concurrency),
            "--method", spec.method, "--auth", spec.auth,
            "--expect-status", str(spec.expect_status), "--out", str(out)]
    if spec.rate is not None:
        argv += ["--rate", str(spec.rate)]
    if spec.body is not None:
        argv += ["--body", spec.body]
    subprocess.run(argv, check=True, timeout=spec.duration + 120,
                   env={**os.environ, **(stack_env or {})},
                   cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.read_text())


class _Schedule:
    """Hands out send times: one every 1/rate s from the start, or "now" in closed-loop mode."""

    def __init__(self, rate: float | None, duration: float):
        self._rate = rate
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self.start = time.monotonic()
        self.start_wall = time.time()  # the same moment on the wall clock the shop stamps with
        self.end = self.start + duration

    def next_due(self) -> float | None:
        with self._lock:
            index = next(self._counter)
        due = self.start + index / self._rate if self._rate else time.monotonic()
        # A server that falls behind gets no catch-up burst after the end: offered load is a rate.
        return due if due < self.end and time.monotonic() < self.end else None

    def unsent(self, sent: int) -> int:
        """How many requests the schedule offered that were never sent, the generator (its
        threads all waiting on a server that fell behind) past the end before it got to them:
        the latest and the most delayed of all, which the latencies of those sent leave out."""
        return max(0, math.ceil(self._rate * (self.end - self.start)) - sent) if self._rate else 0


def _caller_headers(auth: str, method: str, target: str,
                    body: bytes | None) -> Callable[[str], dict[str, str]]:
    """The headers that make the request `method target` with `body` come from one of
    `LoadSpec.users`."""
    if auth == "bearer":
        return lambda token: {"Authorization": f"Bearer {token}"}
    # The services trust only identities the gateway signed, for the request sent; the generator
    # signs each as it would, with the gateway's deadline and a nonce of its own (each signature
    # its own: the service takes an unkeyed order's signature once).
    settings = load_settings()

    def signed(user_id: str) -> dict[str, str]:
        sent_with = deadline_headers(settings.upstream_timeout_seconds)
        return {**sent_with, **identity_headers(user_id, settings.internal_auth_secret, method,
                                                target, body or b"", sent_with=sent_with)}

    return signed


def _send_requests(schedule: _Schedule, spec: LoadSpec, worker: int, results: list):
    body = None if spec.body is None else spec.body.encode()
    content_headers = {} if body is None else {"Content-Type": "application/json"}
    parts = urlsplit(spec.url)
    caller_headers = _caller_headers(spec.auth, spec.method, parts.path, body)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    users = spec.users
    user_turn = itertools.cycle(users[worker % len(users):] + users[:worker % len(users)])
    while (due := schedule.next_due()) is not None:
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        started = time.monotonic()
        try:
            connection.request(spec.method, parts.path, body=body,
                               headers={**content_headers, **caller_headers(next(user_turn))})
            response = connection.getresponse()
            answer = response.read()
            order_id = (json.loads(answer).get("id") if response.status == spec.expect_status
                        else None)
            results.append((started - schedule.start, time.monotonic() - started,
                            response.status, order_id, due - schedule.start))
        except (OSError, http.client.HTTPException) as exc:
            results.append((started - schedule.start, time.monotonic() - started, repr(exc), None,
                            due - schedule.start))
            connection.close()
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.close()


def generate(spec: LoadSpec) -> dict:
    """Offer the load from `spec.concurrency` threads and summarise what came back."""
    cpu_before = os.times()
    schedule = _Schedule(spec.rate, spec.duration)
    results: list = []
    threads = [threading.Thread(target=_send_requests, args=(schedule, spec, worker, results))
               for worker in range(spec.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - schedule.start
    cpu_after = os.times()
    cpu_seconds = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    accepted = [r for r in results if r[2] == spec.expect_status]
    return {
        "offered_rate": spec.rate,
        "duration_s": round(elapsed, 3),
        "requests": len(results),
        "accepted": len(accepted),
        "failed": len(results) - len(accepted),
        "errors": sorted({str(r[2]) for r in results if r[2] != spec.expect_status}),
        "accepted_per_s": round(len(accepted) / elapsed, 1),
        # From when the request was due (its send, unless the generator fell behind) to its
        # answer.
        "http_latency_ms": sorted(round((r[0] - r[4] + r[1]) * 1000, 3) for r in accepted),
        "order_ids": [r[3] for r in accepted if r[3] is not None],
        # When each was due to be sent, on the wall clock (epoch seconds): a request the
        # generator sent late, or the server took late, counts its wait from here (no
        # coordinated omission), and the order's latency to its final status too.
        "order_due_at": [round(schedule.start_wall + r[4], 6) for r in accepted
                         if r[3] is not None],
        "sent_late_p99_ms": latency_summary_ms([r[0] - r[4] for r in results])["p99_ms"],
        "unsent": schedule.unsent(len(results)),
        "generator_cpu_s": round(cpu_seconds, 3),
        "generator_cpu_percent": round(100 * cpu_seconds / elapsed, 1),
        "generator_peak_rss_mb": _peak_rss_mb(),
    }


def _peak_rss_mb() -> float:
    """This process's own peak resident memory (bench.memory.peak_rss_bytes: not the benchmark
    runner's, which started it)."""
    peak = peak_rss_bytes()
    if peak is None:
        raise RuntimeError("no VmHWM in /proc/self/status")
    return round(peak / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--users", required=True,
                        help="comma-separated user ids (--auth signed) or access tokens (bearer)")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--method", default="POST")
    parser.add_argument("--body", default=None, help="a JSON body; none when left out")
    parser.add_argument("--auth", choices=AUTH_SCHEMES, default="signed")
    parser.add_argument("--expect-status", type=int, default=202)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    spec = LoadSpec(url=args.url, users=args.users.split(","), duration=args.duration,
                    rate=args.rate, concurrency=args.concurrency, method=args.method,
                    body=args.body, auth=args.auth, expect_status=args.expect_status)
    args.out.write_text(json.dumps(generate(spec)))
    return 0


if __name__ == "__main__":
    from shared.quiet_interrupt import run_main
    run_main(main)
