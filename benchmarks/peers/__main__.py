"""``python -m benchmarks.peers --sagas 500 --window 100``: run the peers, print a JSON list.

A peer that is not installed or fails is reported in the list with ``completed`` 0, null
numbers and the reason in ``notes`` and ``error``; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import traceback
from typing import Any

from benchmarks.peers import PEERS, missing, runner


def _failed(name: str, n: int, error: str) -> dict[str, Any]:
    return {
        "name": name,
        "sagas": n,
        "completed": 0,
        "sagas_per_s": None,
        "p50_ms": None,
        "p95_ms": None,
        "p99_ms": None,
        "notes": f"not measured: {error}",
        "error": error,
    }


async def _main(args: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for name in args.peers:
        why = missing(name)
        if why is not None:
            results.append(_failed(name, args.sagas, why))
            continue
        knobs: dict[str, Any] = {}
        if args.participants:
            knobs["participants"] = args.participants
        print(f"peers: running {name} ({args.sagas} sagas, window {args.window})", file=sys.stderr)
        try:
            results.append(await runner(name)(args.sagas, args.window, **knobs))
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            results.append(_failed(name, args.sagas, f"{type(exc).__name__}: {exc}"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers", description="Run the checkout saga on peer engines."
    )
    parser.add_argument("--sagas", type=int, default=500, help="sagas per peer (default 500)")
    parser.add_argument("--window", type=int, default=100, help="most in flight (default 100)")
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"comma-separated peers to run (default: {','.join(PEERS)})",
    )
    parser.add_argument(
        "--participants",
        choices=("memory", "postgres"),
        default=None,
        help="participants' step work: in-process dicts (default, or $SAGABUS_PEERS_PARTICIPANTS)"
        " or one PostgreSQL transaction per step",
    )
    args = parser.parse_args(argv)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if args.sagas < 1 or args.window < 1:
        parser.error("--sagas and --window must be at least 1")
    results = asyncio.run(_main(args))
    print(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
