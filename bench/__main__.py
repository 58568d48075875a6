"""`python -m bench` (`make bench`): start a quiet stack of its own, measure, write the report."""

from __future__ import annotations

# Run as a command: Ctrl-C while the modules below load ends it quietly (shared.quiet_interrupt).
if __name__ == "__main__":
    from shared.quiet_interrupt import quiet_while_loading
    quiet_while_loading()

import argparse

from bench.plan import FULL, SMOKE
from bench.report import RESULTS_DIR, incomplete_note, write_report
from bench.runner import run_benchmark
from bench.shop import running_bench_stack, say


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny loads, a few seconds each")
    args = parser.parse_args(argv)
    with running_bench_stack(say) as stack:
        results = run_benchmark(stack, SMOKE if args.smoke else FULL,
                                stack.run_dir / "load", say=say)
    paths = write_report(results, RESULTS_DIR)
    print(paths[1].read_text())
    say(f"wrote {', '.join(map(str, paths))}")
    if "incomplete" in results:
        say(f"INCOMPLETE: {incomplete_note(results['incomplete'])}")
        return 1
    return 0


if __name__ == "__main__":
    from shared.quiet_interrupt import run_main
    run_main(main)
