"""The benchmark's report (bench/report.py) on crafted results of a full run's shape (latency at 50,
100 and 200 orders/s, which the smoke run's one rate never reaches): the targets checked, met and
not, and the Markdown that shows them."""

from __future__ import annotations

import json
import struct

import pytest

from bench.floors import FLOORS
from bench.hops import HOPS
from bench.plan import FULL
from bench.runner import measure_sections
from bench.report import (LATENCY_CHART_SERIES, check_targets, describe_run, latency_figure,
                          markdown, write_report)
from bench.stats import latency_summary_ms

SERVERS = {"kafka_broker": "tansu 0.5", "postgresql": "16.4", "redis": "7.2"}


def latency_row(rate: float, p50: float = 30.0, p99: float = 120.0, within: float = 1.0,
                **counts) -> dict:
    """A latency run's row (bench.pipeline.measure_latency) at `rate`, every order offered
    accepted and final unless `counts` (failed, errors, unsent, not_final, drained) say not."""
    row = {
        "offered_rate": rate, "accepted_per_s": rate, "orders": round(rate * 20),
        "p50_ms": p50, "p95_ms": p99 * 0.8, "p99_ms": p99, "max_ms": p99 * 1.5,
        "final_within_1s": within, "offered_final_within_1s": within, "post_p99_ms": 4.2,
        "sent_late_p99_ms": 0.9, "unsent": 0, "failed": 0, "errors": [], "not_final": 0,
        "drained": True, "generator_cpu_percent": 3.5, "generator_peak_rss_mb": 61.0,
        "hops_p50_ms": {name: 2.5 for name, _covers in HOPS}, "machine_busy": 0.6,
        "cpu_ms_per_order": {"orders-api": 3.1, "PostgreSQL": 7.2},
    }
    return row | counts


def intake_side(accepted_per_s: float) -> dict:
    return {"accepted_per_s": accepted_per_s, "turns_accepted_per_s": [accepted_per_s] * 2,
            "requests": round(accepted_per_s * 10), "server_cpu_ms_per_request": 1.2,
            "errors": [], "drained": True, "generator_cpu_percent": 41.5}


def results_of(latency: list[dict], intake_ratio: float = 0.85, relay_ratio: float = 0.6,
               relay_rows_per_s: int = 120_000) -> dict:
    """A whole run's results, as bench.runner.run_benchmark gathers them (no gateway section)."""
    bare = 400.0
    return describe_run(FULL, SERVERS) | {
        "relay": {"rows": 100_000, "relay_seconds": 0.8, "relay_rows_per_s": relay_rows_per_s,
                  "turns_relay_rows_per_s": [relay_rows_per_s] * 2, "raw_producer_seconds": 0.5,
                  "raw_producer_rows_per_s": round(relay_rows_per_s / relay_ratio),
                  "turns_raw_producer_rows_per_s": [round(relay_rows_per_s / relay_ratio)] * 2,
                  "ratio": relay_ratio},
        "latency": latency,
        "intake": {"baseline": intake_side(bare),
                   "floors": [{"name": floor.process_name, "adds": floor.adds}
                              | intake_side(bare * 0.9) | {"ratio": 0.9} for floor in FLOORS],
                   "orders_api": intake_side(bare * intake_ratio), "ratio": intake_ratio},
        "capacity": {"offered_rate": 400, "accepted_per_s": 250.0, "orders": 17_500,
                     "failed": 0, "errors": [], "window_seconds": 60, "final_per_s": 248.0,
                     "kept_up": True, "drained": True, "generator_cpu_percent": 12.5},
        "peak_rss_mb": {"orders-api": 80.5, "orders-api child 1": 95.0},
    }


def _by_name(targets: list[dict]) -> dict[str, dict]:
    return {target["target"]: target for target in targets}


def test_a_latency_target_with_orders_left_out_of_its_percentiles_is_not_met():
    """At 100/s 200 requests got a 503 or a 504 and 36 accepted orders were never final: the
    percentiles of the orders that were (40 ms) meet the targets, the run does not."""
    row = latency_row(100, p50=40.0, p99=40.0, failed=200, errors=["503", "504"], not_final=36,
                      drained=False)
    targets = _by_name(check_targets(results_of([row])))
    for name in ("p99 POST->final at 100/s (ms)", "p50 POST->final at 100/s (ms)"):
        assert targets[name]["measured"] == 40.0 and targets[name]["met"] is False
        assert targets[name]["left_out"] == "200 failed (503, 504); 36 not final"


@pytest.mark.parametrize("counts, left_out", [
    ({"failed": 1, "errors": ["TimeoutError('timed out')"]},
     "1 failed (TimeoutError('timed out'))"),
    ({"unsent": 3}, "3 unsent"),
    ({"not_final": 2, "drained": False}, "2 not final"),
    ({"drained": False}, "not all final by the drain's deadline"),
], ids=["one failed", "unsent", "not final", "not drained"])
def test_any_order_offered_left_out_of_the_percentiles_leaves_the_latency_targets_unmet(
        counts, left_out):
    targets = _by_name(check_targets(results_of([latency_row(100, **counts)])))
    for name in ("p99 POST->final at 100/s (ms)", "p50 POST->final at 100/s (ms)"):
        assert targets[name]["met"] is False and targets[name]["left_out"] == left_out


def test_the_markdown_counts_the_orders_left_out_and_says_why_a_latency_target_is_not_met():
    results = results_of([latency_row(100, p50=40.0, p99=40.0, failed=200, errors=["503", "504"],
                                      not_final=36, drained=False)])
    text = markdown(results | {"targets": check_targets(results)})
    assert ("| offered/s | accepted/s | failed | unsent | not final | p50 ms | p95 ms | p99 ms "
            "| max ms |") in text
    assert "| 100 | 100 | 200 (503, 504) | 0 | 36 | 40.0 | 32.0 | 40.0 | 60.0 |" in text
    assert ("| p99 POST->final at 100/s (ms) | <= 250 | 40.0 | NO (200 failed (503, 504); "
            "36 not final: left out of the percentiles) |") in text
    assert "The percentiles are those of the orders accepted (202) and final" in text


def test_a_run_at_50_100_and_200_per_s_meets_each_target_at_its_bound():
    results = results_of([latency_row(50, p50=20.0, p99=80.0),
                          latency_row(100, p50=50.0, p99=250.0),
                          latency_row(200, p50=70.0, p99=900.0, within=0.95)],
                         intake_ratio=0.8, relay_ratio=0.5, relay_rows_per_s=20_000)
    assert [(t["target"], t["measured"], t["met"]) for t in check_targets(results)] == [
        ("order intake / bare baseline", 0.8, True),
        ("relay / raw producer", 0.5, True),
        ("relay rows/s", 20_000, True),
        ("p99 POST->final at 100/s (ms)", 250.0, True),
        ("p50 POST->final at 100/s (ms)", 50.0, True),
        ("offered orders final within 1 s at 200/s", 0.95, True),
    ]


def test_a_run_at_50_100_and_200_per_s_past_every_bound_meets_none():
    results = results_of([latency_row(50), latency_row(100, p50=50.1, p99=250.1),
                          latency_row(200, within=0.949)],
                         intake_ratio=0.79, relay_ratio=0.49, relay_rows_per_s=19_999)
    targets = check_targets(results)
    assert len(targets) == 6 and not any(target["met"] for target in targets), targets
    assert not any(target["left_out"] for target in targets)


def test_the_markdown_of_a_run_at_50_100_and_200_per_s_has_a_row_or_column_for_each_rate():
    results = results_of([latency_row(50, p50=20.0, p99=80.0), latency_row(100, p99=300.0),
                          latency_row(200, within=0.5)], intake_ratio=0.7)
    lines = markdown(results | {"targets": check_targets(results)}).splitlines()
    latency_rows = [line for line in lines if line.startswith(("| 50 |", "| 100 |", "| 200 |"))]
    assert [line.split(" | ")[0] for line in latency_rows] == ["| 50", "| 100", "| 200"]
    assert "| 200 | 200 | 0 | 0 | 0 | 30.0 | 96.0 | 120.0 | 180.0 | 50.00% | 50.00% |" in (
        latency_rows[2])
    assert f"| {HOPS[0][0]} | {HOPS[0][1]} | 2.5 | 2.5 | 2.5 |" in lines
    assert "| process | 50/s | 100/s | 200/s |" in lines
    assert "| PostgreSQL | 7.2 | 7.2 | 7.2 |" in lines
    assert "| order intake / bare baseline | >= 0.8 | 0.7 | NO |" in lines
    assert "| relay rows/s | >= 20000 | 120000 | yes |" in lines
    assert "| p99 POST->final at 100/s (ms) | <= 250 | 300.0 | NO |" in lines
    assert "| p50 POST->final at 100/s (ms) | <= 50 | 30.0 | yes |" in lines
    assert "| offered orders final within 1 s at 200/s | >= 0.95 | 0.5 | NO |" in lines


def test_the_figures_are_written_before_the_targets_are_checked(tmp_path):
    """A fault of the report's own (here a row without a field the targets read) loses none of
    the run's figures."""
    row = latency_row(100)
    del row["not_final"]
    results = results_of([row])
    with pytest.raises(KeyError):
        write_report(results, tmp_path, chart=False)
    (written,) = tmp_path.glob("*.json")
    assert json.loads(written.read_text())["latency"] == [row]


def test_the_capacity_line_counts_the_requests_that_failed():
    results = results_of([latency_row(100)])
    results["capacity"] |= {"failed": 120, "errors": ["503"]}
    text = markdown(results | {"targets": check_targets(results)})
    assert "(250.0/s accepted, 120 requests failed (503); kept up: True)" in text


def test_the_load_generators_cpu_is_in_the_intake_table_and_the_capacity_line():
    """Issue 3: the load generator's own CPU use is reported, in the Markdown too."""
    results = results_of([latency_row(100)])
    results["intake"]["orders_api"]["generator_cpu_percent"] = 37.5
    lines = markdown(results | {"targets": check_targets(results)}).splitlines()
    assert ("| served by | POST/s | per turn | / baseline | CPU ms per request "
            "| generator CPU % |") in lines
    assert ("| bare WSGI, raw psycopg2 (the baseline) | 400.0 | [400.0, 400.0] | 1.0 | 1.2 "
            "| 41.5 |") in lines
    assert ("| + the shop's own work: the orders API | 340.0 | [340.0, 340.0] | 0.85 | 1.2 "
            "| 37.5 |") in lines
    capacity = next(line for line in lines if line.startswith("Pipeline capacity:"))
    assert "kept up: True); the load generator used 12.5% of a CPU." in capacity


def _measured_row(rate: float, seconds_to_final: list[float]) -> dict:
    """A latency row whose percentiles are bench.stats' own of `seconds_to_final`, as
    bench.pipeline.measure_latency gives them (None where no order became final)."""
    return latency_row(rate, not_final=0 if seconds_to_final else round(rate * 20)) \
        | latency_summary_ms(seconds_to_final)


def _a_full_runs_results() -> dict:
    """Latency at each of a full run's rates, slower as the load grows; at the last no order
    final by the drain's deadline (every percentile None)."""
    *measured, last = FULL.latency_rates
    return results_of([_measured_row(rate, [0.02 + n * rate / 1e6 for n in range(1000)])
                       for rate in measured] + [_measured_row(last, [])])


def test_the_chart_has_a_line_of_each_figure_over_the_offered_rates():
    results = _a_full_runs_results()
    (axes,) = latency_figure(results).axes
    lines = axes.get_lines()
    assert [line.get_label() for line in lines] == ["p50", "p95", "p99", "max"]
    for line, key in zip(lines, LATENCY_CHART_SERIES):
        assert list(line.get_xdata()) == list(FULL.latency_rates)
        assert list(line.get_ydata()) == [row[key] for row in results["latency"]]
    assert axes.get_yscale() == "log" and results["date"] in axes.get_title()


def test_the_report_draws_its_chart_as_a_png(tmp_path):
    """What `make bench` writes beside the JSON and the Markdown (the smoke run in `make test`
    draws none)."""
    *_, chart = write_report(_a_full_runs_results(), tmp_path)
    png = chart.read_bytes()
    assert chart.suffix == ".png" and png.startswith(b"\x89PNG\r\n\x1a\n")
    # The first chunk is the header: its width and height, in pixels (7 by 4.5 inches at 100 dpi).
    assert png[12:16] == b"IHDR" and struct.unpack(">II", png[16:24]) == (700, 450)
    assert png.endswith(b"IEND\xaeB`\x82")


def test_a_measurement_that_fails_leaves_the_figures_measured_before_it_in_the_report(tmp_path):
    """The intake servers never booted: the relay and latency figures measured before are kept,
    written and shown, and the report says, at its top, that the run is incomplete and why."""
    measured = results_of([latency_row(100)])
    results = describe_run(FULL, SERVERS)

    def intake_failing():
        raise TimeoutError("timed out after 60s waiting for the intake servers to boot")

    measure_sections(results, [("relay", lambda: measured["relay"]),
                               ("latency", lambda: measured["latency"]),
                               ("intake", intake_failing),
                               ("capacity", lambda: measured["capacity"])])

    assert results["relay"] == measured["relay"] and results["latency"] == measured["latency"]
    assert "capacity" not in results  # (not measured after the failure)
    assert results["incomplete"] == {
        "failed": "intake", "not_measured": ["capacity"],
        "error": "TimeoutError: timed out after 60s waiting for the intake servers to boot"}
    json_path, markdown_path = write_report(results, tmp_path, chart=False)
    assert json.loads(json_path.read_text())["incomplete"]["failed"] == "intake"
    text = markdown_path.read_text()
    assert text.splitlines()[2].startswith(
        "**INCOMPLETE RUN**: the intake measurement failed (TimeoutError: timed out after 60s"
        " waiting for the intake servers to boot); not measured: capacity.")
    assert "| relay (rows/s, 100000 rows) |" in text and "| 100 | 100 |" in text
    targets = _by_name(json.loads(json_path.read_text())["targets"])
    assert "relay / raw producer" in targets and "p99 POST->final at 100/s (ms)" in targets
    assert "order intake / bare baseline" not in targets


def test_a_latency_target_met_by_orders_cancelled_is_not_met():
    """A regression that cancels the orders (NO_ACCOUNT, say) takes the cheap path to a final
    status: its latencies meet the targets, the run does not, and the report says why."""
    rows = [latency_row(100, statuses={"CANCELLED": 2000}),
            latency_row(200, statuses={"CANCELLED": 1, "FINISHED": 3999})]
    results = results_of(rows)
    targets = _by_name(check_targets(results))
    for name in ("p99 POST->final at 100/s (ms)", "p50 POST->final at 100/s (ms)"):
        assert targets[name]["met"] is False and targets[name]["left_out"] is None
        assert targets[name]["cancelled"] == "2000 CANCELLED, not paid"
    assert targets["offered orders final within 1 s at 200/s"]["met"] is False
    text = markdown(results | {"targets": check_targets(results)})
    assert ("| p99 POST->final at 100/s (ms) | <= 250 | 120.0 | NO (2000 CANCELLED, not paid:"
            " not the paid path) |") in text
    assert "| generator peak MB | paid / cancelled |" in text and "| 0 / 2000 |" in text


def test_the_capacity_line_counts_its_orders_paid_and_cancelled():
    results = results_of([latency_row(100)])
    results["capacity"]["statuses"] = {"CANCELLED": 3, "FINISHED": 17_497}
    text = markdown(results | {"targets": check_targets(results)})
    assert "Its orders paid / cancelled: 17497 / 3 (every one should be paid)." in text
