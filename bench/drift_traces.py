"""Writes the two drift traces of bench/traces: prompt difficulty changes mid-trace.

`python bench/drift_traces.py` regenerates `bench/traces/drift_harder_2to16qps.txt` and
`drift_easier_2to16qps.txt`. Arrival times are those of `maf_2to16qps.txt` (unchanged, so
load and drift are not confounded); only the prompt index of each request is redrawn:

- before `DRIFT_AT_S`, uniformly over the 5,000 reference prompts (as in the MAF traces);
- from `DRIFT_AT_S` on, uniformly over the `SHARE` of prompts the SD-Turbo gate is least
  (harder) or most (easier) confident about, i.e. the lowest or highest per-prompt confidence
  in the bundled `confidence_sd-turbo.txt` (1 - mean discriminator P(fake) over a prompt's 4
  images, DiffServe's artifact).

The format is the simulator's `<arrival_ms>,<prompt_idx>`: the index is a line of the
confidence list (0-based), so a replay looks each request's gate confidence up by it. `#`
lines at the top say how the file was made.
"""

from __future__ import annotations

import random
from pathlib import Path

from diffcascade_operator.profiles import reference_confidences
from diffcascade_operator.sim.traces import parse_trace

HERE = Path(__file__).resolve().parent / "traces"
BASE = "maf_2to16qps"
GATE = "sd-turbo"
DRIFT_AT_S = 150.0
SHARE = 0.4
SEED = 9


def drift_rows(kind: str, *, seed: int = SEED) -> list[tuple[int, int]]:
    """(arrival ms, prompt index) of the `kind` ("harder"/"easier") trace."""
    base = parse_trace((HERE / f"{BASE}.txt").read_text(), name=BASE)
    confidences = reference_confidences(GATE)
    by_confidence = sorted(range(len(confidences)), key=lambda i: (confidences[i], i))
    cut = round(SHARE * len(confidences))
    pool = by_confidence[:cut] if kind == "harder" else by_confidence[-cut:]
    rng = random.Random(f"{seed}-{kind}")
    rows = []
    for at in base.arrivals_s:
        prompt = rng.choice(pool) if at >= DRIFT_AT_S else rng.randrange(len(confidences))
        rows.append((round(at * 1000), prompt))
    return rows


def header(kind: str) -> list[str]:
    least = "least" if kind == "harder" else "most"
    return [
        f"# drift_{kind}_2to16qps: arrivals of {BASE}.txt; prompt indices into the {GATE}",
        "# reference confidences (operator/diffcascade_operator/reference), uniform over all",
        f"# 5,000 before {DRIFT_AT_S:.0f} s, then over the {SHARE:.0%} the gate is {least} sure of",
        "# Made by bench/drift_traces.py; format <arrival_ms>,<prompt_idx>.",
    ]


def main() -> None:
    for kind in ("harder", "easier"):
        path = HERE / f"drift_{kind}_2to16qps.txt"
        lines = header(kind) + [f"{ms}.0,{prompt}" for ms, prompt in drift_rows(kind)]
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path.name}: {len(lines) - 4} requests")


if __name__ == "__main__":
    main()
