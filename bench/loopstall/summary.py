"""Summarize a loop-stall census (bench/loopstall/sitecustomize.py): how many long steps,
their total, the longest, and the time by callback kind inside them.

    .venv/bin/python bench/loopstall/summary.py /tmp/stalls.txt
"""

from __future__ import annotations

import re
import sys
from collections import Counter

STEP = re.compile(r"STEP ([\d.]+) ms .* gc=([\d.]+)ms (.*)$")
KIND = re.compile(r"(\S+)=(\d+)/([\d.]+)ms")


def main(path: str) -> None:
    steps: list[float] = []
    in_gc = 0.0
    by_kind: Counter[str] = Counter()
    with open(path) as f:
        for line in f:
            found = STEP.search(line)
            if found is None:
                continue
            steps.append(float(found.group(1)))
            in_gc += float(found.group(2))
            for kind in KIND.finditer(found.group(3)):
                by_kind[kind.group(1)] += float(kind.group(3))
    steps.sort()
    print(
        f"long loop steps: {len(steps)} (> 25 ms: {sum(s > 25 for s in steps)}, > 50 ms: "
        f"{sum(s > 50 for s in steps)}), {sum(steps):.0f} ms in all, {in_gc:.0f} ms of it in "
        f"garbage collection; longest {', '.join(f'{s:.0f}' for s in steps[-5:])} ms"
    )
    print("time in them by callback kind (ms):")
    for kind, ms in by_kind.most_common(12):
        print(f"  {ms:8.0f}  {kind}")


if __name__ == "__main__":
    main(sys.argv[1])
