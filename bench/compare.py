"""Old commit against this checkout, back to back: bench/drain.py run alternately in each.

    .venv/bin/python bench/compare.py --old-tree /tmp/oldwt --runs 3 [-- drain.py options]

`--old-tree` is a checkout of the old commit with its own .venv (`git worktree add
/tmp/oldwt <commit> && make -C /tmp/oldwt venv`). The runs alternate (old, new, old, new, ...)
so that the machine's drift hits both alike; each run's SUMMARY figures are printed, then the
median of each side and the new/old ratio. Figures: drain callbacks/s, the daemon's CPU
seconds per 1,000 callbacks, the idle first-send p99 and p50, the /healthz p99 (loop stalls),
and window violations at the wire. One run's first-send p99 is nearly its slowest probe (50
probes in a --quick run): use --probe-interval 0.05 and several runs for a steadier figure.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

FIGURES = {
    "callbacks/s": re.compile(r"SUMMARY drain: ([\d,]+) callbacks/s"),
    "CPU s/1k": re.compile(r"daemon CPU ([\d.]+) s per 1,000 callbacks"),
    "first-send p99 ms": re.compile(r"idle first-send p99 ([\d.,]+) ms"),
    "violations": re.compile(r"window violations (\d+)"),
}
# From the whole output (both commits print these lines): steadier than one p99 of ~50 probes.
DETAILS = {
    "first-send p50 ms": re.compile(r"idle first-send\s+: \d+ probes, p50 ([\d.,]+) ms"),
    "healthz p99 ms": re.compile(
        r"GET /healthz every \d+ ms, latency p50 [\d.]+ ms, p99 ([\d.,]+) ms"
    ),
}


def run(tree: Path, extra: list[str]) -> dict[str, float]:
    """One bench/drain.py run in `tree`, with its own venv; its SUMMARY figures."""
    argv = [str(tree / ".venv/bin/python"), str(tree / "bench/drain.py"), *extra]
    out = subprocess.run(argv, cwd=tree, capture_output=True, text=True, timeout=1800)
    summary = next((ln for ln in out.stdout.splitlines() if ln.startswith("SUMMARY")), "")
    if not summary:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
        raise SystemExit(f"no SUMMARY from {tree} (exit {out.returncode})")
    figures = {}
    for name, pattern in FIGURES.items():
        found = pattern.search(summary)
        figures[name] = float(found.group(1).replace(",", "")) if found else float("nan")
    for name, pattern in DETAILS.items():
        found = pattern.search(out.stdout)
        figures[name] = float(found.group(1).replace(",", "")) if found else float("nan")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-tree", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3, help="runs of each side")
    parser.add_argument("drain_args", nargs="*", help="passed to bench/drain.py (after --)")
    args = parser.parse_args()
    extra = args.drain_args or ["--quick"]
    sides: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    trees = {"old": args.old_tree.resolve(), "new": HERE}
    print(f"old: {trees['old']}  new: {trees['new']}  drain.py {' '.join(extra)}", flush=True)
    for n in range(args.runs):
        for side in ("old", "new"):
            figures = run(trees[side], extra)
            sides[side].append(figures)
            shown = ", ".join(f"{k} {v:,.3f}" for k, v in figures.items())
            print(f"run {n + 1} {side}: {shown}", flush=True)
    print("\nmedian of each side (new / old):")
    for name in (*FIGURES, *DETAILS):
        old = statistics.median(f[name] for f in sides["old"])
        new = statistics.median(f[name] for f in sides["new"])
        ratio = f"{new / old:.3f}" if old else "n/a"
        print(f"  {name:<18} old {old:>10,.3f}   new {new:>10,.3f}   ratio {ratio}")


if __name__ == "__main__":
    main()
