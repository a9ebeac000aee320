"""The ``otel-recovery`` command (also ``python -m otel_recovery``).

Only argument parsing lives here; the demo is imported when its subcommand runs, so
``otel-recovery version`` stays instant and needs nothing beyond the core dependencies.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from otel_recovery.__about__ import VERSION

__all__ = ["main"]


MAX_DEMO_CALLS = 10_000
"""Each logical call is real HTTP to the local fault server, paced: 10,000 take minutes."""


def _call_count(text: str) -> int:
    """``--calls``: a whole number from 10 (fewer cannot show a recovery rate) to
    :data:`MAX_DEMO_CALLS`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of at least 10, got {text!r}"
        ) from None
    if value < 10:
        raise argparse.ArgumentTypeError(f"must be at least 10, got {value}")
    if value > MAX_DEMO_CALLS:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_DEMO_CALLS:,} (the calls are real, paced HTTP requests), "
            f"got {value:,}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otel-recovery",
        description="Error recovery that lives inside OpenTelemetry.",
    )
    parser.add_argument("--version", action="version", version=f"otel-recovery {VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run a recovery scenario against a local, deliberately flaky HTTP server",
        description=(
            "Start a local HTTP dependency that answers 503 bursts, 429 with Retry-After, "
            "connection resets, stalls, 400s and a hard outage on a seeded schedule; call it "
            "through retry + budget + circuit breaker + timeout + fallback; print what "
            "recovered what. Spans go to OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set "
            "(e.g. a local Jaeger), otherwise they are kept in memory and summarised."
        ),
    )
    demo.add_argument(
        "--calls", type=_call_count, default=200, help="logical calls, 10 to 10000 (default 200)"
    )
    demo.add_argument("--seed", type=int, default=1, help="fault schedule seed (default 1)")
    demo.add_argument(
        "--short",
        action="store_true",
        help="shorter pauses, timeouts and outage: a quick look (used by the tests)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    commands.add_parser("version", help="print the version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        print(f"otel-recovery {VERSION}")
        return 0
    if args.command == "demo":
        from otel_recovery._demo.run import run_demo
        from otel_recovery._demo.scenario import Settings

        if args.short:
            settings = Settings.short(args.calls, args.seed)
        else:
            settings = Settings(calls=args.calls, seed=args.seed)
        return run_demo(settings, progress=not args.no_progress)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
