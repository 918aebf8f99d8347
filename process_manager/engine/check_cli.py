"""``python -m process_manager.engine.check``: check every registered definition and print a
table (definition, states explored, transitions, max depth, seconds). Exits 1 on a violation,
after printing each one with its trace."""

from __future__ import annotations

import sys
import time

from process_manager.engine.check import check, table


def main() -> int:
    from process_manager.definitions import ALL

    reports = [check(d, clock=time.perf_counter) for d in ALL]
    out = sys.stdout
    out.write(table(reports) + "\n")
    for r in reports:
        for v in r.violations:
            out.write(f"\n{r.ref}: {v}\n")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
