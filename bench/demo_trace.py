"""Writes the demo's bundled trace: a low phase, a step up, a short low tail.

`python bench/demo_trace.py` regenerates operator/diffcascade_operator/local/demo_trace.txt
(`<arrival_ms>,<prompt_idx>` lines, the DiffServe format). Poisson arrivals from the first seed
whose phases all lie within 10% of their expected counts. The step is sized for the demo
cascade's profile: at the high rate the controller needs a second heavy replica and a lower
threshold.
"""

from __future__ import annotations

import random
from pathlib import Path

PHASES = ((0.0, 15.0, 1.0), (15.0, 45.0, 8.0), (45.0, 55.0, 1.0))  # (start s, end s, qps)
PROMPTS = 1000
FIRST_SEED = 0
OUT = Path(__file__).resolve().parent.parent / "operator/diffcascade_operator/local/demo_trace.txt"


def arrivals(seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    rows = []
    for start, end, qps in PHASES:
        at = start + rng.expovariate(qps)
        while at < end:
            rows.append((round(at * 1000), rng.randrange(PROMPTS)))
            at += rng.expovariate(qps)
    return rows


def typical(rows: list[tuple[int, int]], tolerance: float = 0.1) -> bool:
    """Every phase within `tolerance` of its expected count (a short trace can be unlucky)."""
    for start, end, qps in PHASES:
        count = sum(start * 1000 <= ms < end * 1000 for ms, _ in rows)
        if abs(count - qps * (end - start)) > tolerance * qps * (end - start):
            return False
    return True


def main() -> None:
    seed = FIRST_SEED
    while not typical(rows := arrivals(seed)):
        seed += 1
    header = "# diffcascade demo trace: 1 qps for 15 s, 8 qps for 30 s, 1 qps for 10 s (Poisson)\n"
    OUT.write_text(header + "".join(f"{ms},{idx}\n" for ms, idx in rows), encoding="utf-8")
    print(f"wrote {len(rows)} requests (seed {seed}) to {OUT}")


if __name__ == "__main__":
    main()
