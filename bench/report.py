"""The benchmark's report: the targets checked, JSON and a Markdown table in bench/results/, and a
PNG chart of latency against offered load."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from bench.hops import HOPS
from bench.plan import BenchPlan
from devstack.stack import API_THREADS, API_WORKERS, GATEWAY_THREADS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TRANSPORT_NAMES = {"grpc": "gRPC", "http": "HTTP"}
# The latency row's figures (bench.stats.latency_summary_ms) the chart draws, a line each.
LATENCY_CHART_SERIES = ("p50_ms", "p95_ms", "p99_ms", "max_ms")


def describe_run(plan: BenchPlan, servers: dict[str, str]) -> dict:
    """What every report starts with: when, on what (`servers`: bench.servers.server_versions),
    and how hard."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "servers": servers,
        "api_server": {"workers": API_WORKERS, "threads": API_THREADS,
                       "gateway_threads": GATEWAY_THREADS},
        "plan": plan.__dict__ | {"latency_rates": list(plan.latency_rates)},
    }


def check_targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured value, whether it is met and, for a latency
    percentile, the orders offered that it leaves out (orders_left_out): one that leaves any out
    is not met, whatever its value, since those orders' latencies are unknown (none, or longer
    than the run's drain). A section an incomplete run never measured has no targets."""
    latency = {row["offered_rate"]: row for row in results.get("latency", [])}
    targets = []
    if "intake" in results:
        targets.append(("order intake / bare baseline", ">= 0.8", results["intake"]["ratio"],
                        lambda v: v >= 0.8, None))
    if "relay" in results:
        relay = results["relay"]
        targets += [
            ("relay / raw producer", ">= 0.5", relay["ratio"], lambda v: v >= 0.5, None),
            ("relay rows/s", ">= 20000", relay["relay_rows_per_s"], lambda v: v >= 20_000, None),
        ]
    if 100 in latency:
        left_out = orders_left_out(latency[100])
        targets += [
            ("p99 POST->final at 100/s (ms)", "<= 250", latency[100]["p99_ms"],
             lambda v: v is not None and v <= 250, left_out, orders_cancelled(latency[100])),
            ("p50 POST->final at 100/s (ms)", "<= 50", latency[100]["p50_ms"],
             lambda v: v is not None and v <= 50, left_out, orders_cancelled(latency[100])),
        ]
    if 200 in latency:
        # (Of the orders offered: one failed, unsent or not final is not final within 1 s.)
        targets.append(("offered orders final within 1 s at 200/s", ">= 0.95",
                        latency[200]["offered_final_within_1s"], lambda v: v >= 0.95, None,
                        orders_cancelled(latency[200])))
    return [{"target": target[0], "wanted": target[1], "measured": target[2],
             "met": not target[4] and not _cancelled(target) and target[3](target[2]),
             "left_out": target[4], "cancelled": _cancelled(target)}
            for target in targets]


def _cancelled(target: tuple) -> str | None:
    return target[5] if len(target) > 5 else None


def orders_cancelled(row: dict) -> str | None:
    """The bench's orders of a run that ended CANCELLED, said (None if none): every shopper the
    bench seeds is rich enough to pay for all of them, so each is a fault (an account missing, a
    refusal), and its latency the refusal's, far cheaper than the paid path the targets are for:
    a run cancelling every order would meet them on the cheap."""
    cancelled = row.get("statuses", {}).get("CANCELLED", 0)  # (not counted before 2026-12-07)
    return f"{cancelled} CANCELLED, not paid" if cancelled else None


def orders_left_out(row: dict) -> str | None:
    """The orders offered in a latency run that its percentiles leave out, said (None if none):
    the requests that failed (an answer other than 202, or none), those the generator never
    sent, and the accepted orders not final by the drain's deadline."""
    parts = []
    if row["failed"]:
        parts.append(f"{row['failed']} failed ({', '.join(row['errors'])})")
    if row["unsent"]:
        parts.append(f"{row['unsent']} unsent")
    if row["not_final"]:
        parts.append(f"{row['not_final']} not final")
    if not row["drained"] and not row["not_final"]:
        parts.append("not all final by the drain's deadline")
    return "; ".join(parts) or None


def markdown(results: dict) -> str:
    lines = [f"# HseShop benchmark, {results['date']}", ""]
    if "incomplete" in results:
        lines += [f"**INCOMPLETE RUN**: {incomplete_note(results['incomplete'])}. The figures "
                  "below are those measured before it failed; the targets of the sections not "
                  "measured are not checked.", ""]
    lines += [_machine_line(results), ""]
    intake, relay = results.get("intake"), results.get("relay")
    if intake or relay:
        lines += ["| measure | HseShop | raw baseline | ratio |", "| --- | --- | --- | --- |"]
    if intake:
        lines.append(f"| order intake (POST/s) | {intake['orders_api']['accepted_per_s']} "
                     f"| {intake['baseline']['accepted_per_s']} | {intake['ratio']} |")
    if relay:
        lines.append(f"| relay (rows/s, {relay['rows']} rows) | {relay['relay_rows_per_s']} "
                     f"| {relay['raw_producer_rows_per_s']} | {relay['ratio']} |")
        lines += ["", *_relay_turns_lines(relay)[:-1]]
    if intake:
        lines += ["", _intake_turns_and_settling_line(results), "", *intake_floor_lines(intake)]
    if "capacity" in results:
        lines += ["", _capacity_line(results["capacity"])]
    if results.get("latency"):
        lines += ["", *latency_lines(results["latency"])]
    lines += ["", "| target | wanted | measured | met |", "| --- | --- | --- | --- |"]
    for target in results["targets"]:
        why = [f"{target['left_out']}: left out of the percentiles"] if target["left_out"] else []
        if target.get("cancelled"):
            why.append(f"{target['cancelled']}: not the paid path")
        because = f" ({'; '.join(why)})" if why else ""
        lines.append(f"| {target['target']} | {target['wanted']} | {target['measured']} "
                     f"| {'yes' if target['met'] else 'NO'}{because} |")
    if "gateway_transports" in results:
        lines += ["", *gateway_transports_lines(results["gateway_transports"])]
    lines += ["", "| process | peak RSS MB |", "| --- | --- |"]
    lines += [f"| {name} | {mb} |" for name, mb in results.get("peak_rss_mb", {}).items()]
    return "\n".join(lines) + "\n"


def incomplete_note(incomplete: dict) -> str:
    """What an incomplete run's `incomplete` (bench.runner.measure_sections) says, in a line."""
    note = f"the {incomplete['failed']} measurement failed ({incomplete['error']})"
    if incomplete["not_measured"]:
        note += f"; not measured: {', '.join(incomplete['not_measured'])}"
    return note


def latency_lines(latency: list[dict]) -> list[str]:
    """The latency runs' table, with what its percentiles leave out, and where time and CPU go."""
    lines = [
        "Latency is counted from the moment each POST was due to be sent (the offered rate's "
        "schedule: a request the generator sent late, or one left waiting for a server thread, "
        "counts that wait) to the status's time in the order's row. The percentiles are those of "
        "the orders accepted (202) and final: a request that failed (any other answer, or none "
        "in time: \"failed\", with their kinds), one the generator never sent, still waiting on "
        "a server thread when the load's time was up (\"unsent\"), and an accepted order not "
        "final by the drain's deadline (\"not final\") are counted apart (and as not final in "
        "time, of those offered), not in them. So a latency target is met only where none was "
        "left out: every order offered accepted and final.",
        "",
        "| offered/s | accepted/s | failed | unsent | not final | p50 ms | p95 ms | p99 ms "
        "| max ms | final within 1 s (of accepted) | (of offered) | POST p99 ms "
        "| sent late p99 ms | generator CPU % | generator peak MB | paid / cancelled |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- | --- |",
    ]
    for row in latency:
        lines.append(
            f"| {row['offered_rate']:g} | {row['accepted_per_s']} | {_failed_cell(row)} "
            f"| {row.get('unsent')} | {row['not_final']} | {row['p50_ms']} "
            f"| {row['p95_ms']} | {row['p99_ms']} | {row['max_ms']} | {row['final_within_1s']:.2%} "
            f"| {row['offered_final_within_1s']:.2%} "
            f"| {row['post_p99_ms']} | {row.get('sent_late_p99_ms')} "
            f"| {row['generator_cpu_percent']} | {row.get('generator_peak_rss_mb')} "
            f"| {_paid_and_cancelled(row)} |")
    return [*lines, "", *where_time_and_cpu_go_lines(latency)]


def _paid_and_cancelled(row: dict) -> str:
    """A run's orders FINISHED (paid) and CANCELLED, "paid / cancelled" ("?" if not counted)."""
    if "statuses" not in row:  # (not counted before 2026-12-07)
        return "?"
    return f"{row['statuses'].get('FINISHED', 0)} / {row['statuses'].get('CANCELLED', 0)}"


def _failed_cell(row: dict) -> str:
    return f"{row['failed']} ({', '.join(row['errors'])})" if row["failed"] else "0"


def _capacity_line(capacity: dict) -> str:
    failed = (f", {capacity['failed']} requests failed ({', '.join(capacity['errors'])})"
              if capacity.get("failed") else "")  # (not counted before 2026-12-07)
    line = (f"Pipeline capacity: {capacity['final_per_s']} orders/s reached a final status over "
            f"{capacity['window_seconds']:g} s with {capacity['offered_rate']:g}/s offered "
            f"({capacity['accepted_per_s']}/s accepted{failed}; kept up: {capacity['kept_up']}); "
            f"the load generator used {capacity['generator_cpu_percent']}% of a CPU.")
    if "statuses" in capacity:  # (not counted before 2026-12-07)
        line += (f" Its orders paid / cancelled: {_paid_and_cancelled(capacity)}"
                 f"{' (every one should be paid)' if orders_cancelled(capacity) else ''}.")
    if capacity["kept_up"] and capacity["accepted_per_s"] < 0.95 * capacity["offered_rate"]:
        line += (" The API took fewer than offered and the pipeline carried all it took: its "
                 "capacity is at least this, the API's intake the bound here.")
    return line


def _relay_turns_lines(relay: dict) -> list[str]:
    return [f"Relay speed in turns of {relay['rows']} rows (relay, raw producer, raw producer, "
            f"relay, ...), each side's rows/s over all its turns together: the relay's turns "
            f"{relay['turns_relay_rows_per_s']}, the raw producer's "
            f"{relay['turns_raw_producer_rows_per_s']}.", ""]


def _intake_turns_and_settling_line(results: dict) -> str:
    plan, intake = results["plan"], results["intake"]
    line = (f"Order intake, closed loop ({plan['intake_concurrency']} connections), in turns of "
            f"{plan['intake_seconds']:g} s (baseline, floors, API, API, floors, baseline, ...), "
            f"the whole shop settled before each; each side's POST/s per turn and its serving "
            f"processes' CPU per request are in the table below.")
    if not all(side["drained"] for side in (intake["baseline"], *intake["floors"],
                                            intake["orders_api"])):
        line += " The shop did not settle after every turn."
    if results.get("unsettled_before"):
        line += (" Measurements started while the shop still had work pending: "
                 f"{', '.join(results['unsettled_before'])}.")
    return line


def intake_floor_lines(intake: dict) -> list[str]:
    """The baseline's work under each layer of the API's stack (bench/floors.py), then the API."""
    sides = [("bare WSGI, raw psycopg2 (the baseline)", intake["baseline"], 1.0),
             *((floor["adds"], floor, floor["ratio"]) for floor in intake["floors"]),
             ("+ the shop's own work: the orders API", intake["orders_api"], intake["ratio"])]
    return [
        "Where intake goes: the baseline's two inserts served under each layer of the API's stack "
        "(bench/floors.py), each floor adding one layer to the one above it; to the last floor, "
        "the API adds only the shop's own work per request (bench/floors.py lists it: the user's "
        "placing lock among it).",
        "",
        "| served by | POST/s | per turn | / baseline | CPU ms per request | generator CPU % |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {name} | {side['accepted_per_s']} | {side['turns_accepted_per_s']} | {ratio} "
          f"| {side['server_cpu_ms_per_request']} | {side['generator_cpu_percent']} |"
          for name, side, ratio in sides),
    ]


def where_time_and_cpu_go_lines(latency: list[dict]) -> list[str]:
    """The latency runs' hops (medians) and CPU per order by process, one column per rate."""
    rates = [f"{row['offered_rate']:g}/s" for row in latency]
    lines = [
        "Where the time goes: the median of each hop, from the timestamps the shop keeps, and how "
        "busy the machine's CPUs were while the load was offered.",
        "",
        f"| hop | what it covers | {' | '.join(rates)} |",
        f"| --- | --- |{' --- |' * len(rates)}",
    ]
    for name, covers in HOPS:
        medians = " | ".join(str(row["hops_p50_ms"][name]) for row in latency)
        lines.append(f"| {name} | {covers} | {medians} |")
    busy = [f"{row['machine_busy']:.0%}" for row in latency]
    lines.append(f"| machine CPU busy | | {' | '.join(busy)} |")
    per_order = [row["cpu_ms_per_order"] for row in latency]
    processes = sorted({name for row in per_order for name in row},
                       key=lambda name: -max(row.get(name, 0) for row in per_order))
    lines += [
        "",
        "CPU per order (ms) of each process (with its children) from the start of the load until "
        "its last order was final; PostgreSQL and Redis are every process of those servers.",
        "",
        f"| process | {' | '.join(rates)} |",
        f"| --- |{' --- |' * len(rates)}",
    ]
    for name in processes:
        lines.append(f"| {name} | {' | '.join(str(row.get(name, 0)) for row in per_order)} |")
    totals = [round(sum(row.values()), 1) for row in per_order]
    lines.append(f"| all of these | {' | '.join(map(str, totals))} |")
    return lines


def gateway_transports_lines(section: dict) -> list[str]:
    """The Markdown of bench/gateway_transports.py's measurement."""
    lines = [
        "## Gateway: services over gRPC against HTTP",
        "",
        f"Two gateway instances, alike but for GATEWAY_UPSTREAM_TRANSPORT; closed loop, "
        f"{section['concurrency']} connections; {section['shoppers']} signed-in shoppers read "
        f"their balance, {section['shoppers']} others, holding no account, place orders; "
        f"{section['rounds']} × {section['seconds_per_turn']:g} s per endpoint and transport, "
        f"in turns (gRPC, HTTP, gRPC, ...). Latency is the HTTP round trip of a successful "
        f"request, as the generator saw it.",
        "",
        "| endpoint | transport | requests/s | p50 ms | p95 ms | p99 ms | max ms | errors "
        "| generator CPU % |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for endpoint in section["endpoints"].values():
        for transport, name in TRANSPORT_NAMES.items():
            row = endpoint[transport]
            lines.append(
                f"| {endpoint['method']} {endpoint['path']} | {name} | {row['requests_per_s']} "
                f"| {row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} | {row['max_ms']} "
                f"| {row['errors']} | {row['generator_cpu_percent']} |")
    ratios = ", ".join(f"{endpoint['method']} {endpoint['path']} {endpoint['grpc_over_http']}"
                       for endpoint in section["endpoints"].values())
    lines += ["", f"Requests/s over gRPC / over HTTP: {ratios}."]
    return lines


def _machine_line(results: dict) -> str:
    return (f"{results['machine']['cpus']} CPUs, Python {results['machine']['python']}, "
            f"{results['machine']['platform']}; APIs on gunicorn -w "
            f"{results['api_server']['workers']} --threads {results['api_server']['threads']}"
            f"{_gateway_threads_note(results['api_server'])}; "
            f"everything on this one machine.{_servers_note(results)}"
            f"{_speed_note(results['machine'])}")


def _gateway_threads_note(api_server: dict) -> str:
    threads = api_server.get("gateway_threads")  # (not recorded before 2026-12-04, evening)
    return f" (the gateways --threads {threads})" if threads else ""


def _servers_note(results: dict) -> str:
    servers = results["servers"]
    return (f" Kafka broker: {servers['kafka_broker']} (the test broker; production runs Apache "
            f"Kafka); PostgreSQL {servers['postgresql']}; Redis {servers['redis']}.")


def _speed_note(machine: dict) -> str:
    loop = machine.get("python_loop_ms")
    if not loop:
        return ""
    return (f" A fixed pure-Python loop took {loop['start']} ms of CPU at the start of the run and "
            f"{loop.get('end', '?')} ms at its end (bench/machine_speed.py; it sees the CPU's "
            f"speed, not the disk's or the scheduler's, so runs made apart compare only roughly).")


def latency_figure(results: dict) -> Figure:
    """The chart of a run's latency POST -> final against offered load: a line for each of p50,
    p95, p99 and max over the latency runs' offered rates. A figure of its own (no pyplot, so no
    global state to close, nor a backend to pick: a PNG is drawn by Agg, whatever the machine)."""
    from matplotlib.figure import Figure

    rates = [row["offered_rate"] for row in results["latency"]]
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for key in LATENCY_CHART_SERIES:
        axes.plot(rates, [row[key] for row in results["latency"]], marker="o",
                  label=key.removesuffix("_ms"))
    axes.set_xlabel("offered load (orders/s)")
    axes.set_ylabel("POST /orders -> final status (ms)")
    axes.set_yscale("log")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    axes.set_title(f"HseShop latency, {results['date']}")
    figure.tight_layout()
    return figure


def draw_latency_chart(results: dict, path: Path) -> None:
    """The chart (latency_figure) as a PNG at `path`, 700 by 450 pixels."""
    latency_figure(results).savefig(path, format="png", dpi=100)


def write_report(results: dict, directory: Path = RESULTS_DIR, chart: bool = True) -> list[Path]:
    """Write <date>.json, <date>.md and (unless `chart` is false, or no latency was measured)
    <date>.png;
    return their paths. The figures are written first, as measured: a fault in checking the
    targets or writing the Markdown loses none of the run's figures (the JSON is written again,
    with the targets, once they are checked)."""
    stem = _stem(results)
    _write_json(results, directory, stem)
    results = results | {"targets": check_targets(results)}
    paths = _write(results, markdown(results), directory, stem)
    if chart and results.get("latency"):  # (an incomplete run may have no latency to draw)
        paths.append(directory / f"{stem}.png")
        draw_latency_chart(results, paths[2])
    return paths


def write_gateway_transports_report(results: dict, directory: Path = RESULTS_DIR) -> list[Path]:
    """Write <date>-gateway-transports.json and .md for `python -m bench.gateway_transports`;
    return their paths."""
    text = "\n".join([f"# HseShop gateway transports, {results['date']}", "",
                      _machine_line(results), "",
                      *gateway_transports_lines(results["gateway_transports"])]) + "\n"
    return _write(results, text, directory, f"{_stem(results)}-gateway-transports")


def _stem(results: dict) -> str:
    return results["date"][:19].replace(":", "-")


def _write(results: dict, markdown_text: str, directory: Path, stem: str) -> list[Path]:
    paths = [_write_json(results, directory, stem), directory / f"{stem}.md"]
    paths[1].write_text(markdown_text)
    return paths


def _write_json(results: dict, directory: Path, stem: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
