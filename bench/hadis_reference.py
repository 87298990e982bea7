"""Write the HADIS benchmark's reference data and traces (deterministic).

- `--hadis PATH` (a checkout of github.com/qizhengyang98/HADIS, MIT): the artifact's own
  files, derived exactly as its worker reads them (the bundled files were written this way):
  - `hadis/traces/maf/multi_dynamic_testbed/trace_64qps.txt` is copied unchanged to
    `bench/traces/hadis_e1_64qps.txt` (the simulator sorts a trace on read);
  - `hadis/traces/text_imagenet1k_hr_5k.txt` and `hadis/router/prompt_features.csv` are copied
    unchanged to `reference/hadis_prompts.txt` and `reference/hadis_prompt_features.csv`;
  - per-prompt router scores: `zscore(prompt_features.csv[:, 1:]) @ weights`, the z-score
    with pandas' default sample standard deviation (ddof 1) over the 5,000 prompts, weights
    (0.85, 0.32, 0.72, 0.99, 0.76, 0.07, 0.78, 0.01) (`model.py`, `isHardByRouter`);
  - per-prompt gate confidences of each variant: column 1 (P(real)) of
    `scores_model_<k>.txt`, averaged over each prompt's 4 images.
- always: the rescaled traces `hadis_maf_<peak>qps.txt`, made with the artifact's generator
  (`traces/maf/shape/2_generate_trace_from_shape.py`: Poisson arrivals per second, an arrival
  kept when its gap is under 1 s, prompt index uniform in 1..4999) from the MAF shape min-max
  scaled to 1..peak qps, numpy seed 0.

    .venv/bin/python bench/hadis_reference.py                  # the rescalings
    .venv/bin/python bench/hadis_reference.py --hadis ../HADIS # and the artifact's data
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
REFERENCE = ROOT / "operator" / "diffcascade_operator" / "reference"
TRACES = BENCH / "traces"
SHAPE = TRACES / "maf_shape_hourly.csv"
PROMPTS = 5000
#: The artifact's model order and the scenario's variant names.
VARIANTS = ("sdxl-lightning", "sd35-large-turbo", "sd35-medium", "sd35-large")
ROUTER_WEIGHTS = (0.85, 0.32, 0.72, 0.99, 0.76, 0.07, 0.78, 0.01)
E1_PEAK = 64
RESCALED_PEAKS = (16, 32, 48)


def router_scores(features: list[list[float]]) -> list[float]:
    """HADIS's rule-router score per prompt: z-scored features (sample std) dot the weights."""
    columns = list(zip(*features, strict=True))
    if len(columns) != len(ROUTER_WEIGHTS):
        raise ValueError(f"expected {len(ROUTER_WEIGHTS)} features, got {len(columns)}")
    stats = []
    for column in columns:
        mean = sum(column) / len(column)
        var = sum((v - mean) ** 2 for v in column) / (len(column) - 1)
        stats.append((mean, math.sqrt(var)))
    return [
        sum(w * (v - m) / s for w, v, (m, s) in zip(ROUTER_WEIGHTS, row, stats, strict=True))
        for row in features
    ]


def confidences(values: list[float], images_per_prompt: int = 4) -> list[float]:
    """Column-1 P(real) values, one per image -> one mean per prompt."""
    if len(values) % images_per_prompt:
        raise ValueError(f"{len(values)} scores do not split into groups of {images_per_prompt}")
    return [
        sum(values[i : i + images_per_prompt]) / images_per_prompt
        for i in range(0, len(values), images_per_prompt)
    ]


def shape_trace(peak: float, *, seed: int = 0) -> str:
    """The artifact's generator on the MAF shape min-max scaled to [1, peak] requests/s."""
    with SHAPE.open() as handle:
        invocations = [float(r["invocations"]) for r in csv.DictReader(handle)]
    lo, hi = min(invocations), max(invocations)
    rng = np.random.RandomState(seed)
    arrivals: list[float] = []
    offset = 0.0
    for value in invocations:
        requests = round(1.0 + (value - lo) / (hi - lo) * (peak - 1.0))
        gaps = np.rint(rng.exponential(scale=1000.0 / requests, size=requests))
        current = 0.0
        for gap in gaps:
            current += float(gap)
            if gap < 1000:
                arrivals.append(offset + current)
        offset += 1000.0
    lines = [f"{t},{rng.randint(1, PROMPTS)}" for t in arrivals]
    return "\n".join(lines) + "\n"


def write_values(path: Path, values: list[float], header: str | None) -> None:
    body = "\n".join(f"{v:.10g}" for v in values) + "\n"
    path.write_text((header + "\n" if header else "") + body)


def from_artifact(hadis: Path, *, reference: Path = REFERENCE, traces: Path = TRACES) -> None:
    """The artifact's trace, router scores and confidences, from a checkout."""
    src = hadis / "hadis"
    shutil.copyfile(
        src / "traces" / "maf" / "multi_dynamic_testbed" / "trace_64qps.txt",
        traces / "hadis_e1_64qps.txt",
    )
    prompts = src / "traces" / "text_imagenet1k_hr_5k.txt"
    if prompts.exists():
        shutil.copyfile(prompts, reference / "hadis_prompts.txt")
    shutil.copyfile(src / "router" / "prompt_features.csv", reference / "hadis_prompt_features.csv")
    with (src / "router" / "prompt_features.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    features = [[float(v) for v in row[1:]] for row in rows[1:]]
    write_values(reference / "router_hadis-rule.txt", router_scores(features), None)
    for k, name in enumerate(VARIANTS):
        lines = (src / "discriminator" / "confidence_scores" / f"scores_model_{k}.txt").read_text()
        # Column 1 (P(real)); a copy holding that column alone is read the same way.
        real = [float(line.split()[-1]) for line in lines.splitlines() if line.strip()]
        write_values(reference / f"confidence_hadis-{name}.txt", confidences(real), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hadis", type=Path, default=None, help="a checkout of the artifact: rewrite its files"
    )
    args = parser.parse_args(argv)
    if args.hadis is not None:
        from_artifact(args.hadis)
    for peak in RESCALED_PEAKS:
        header = (
            f"# the HADIS generator on the MAF shape scaled to 1-{peak} qps, numpy seed 0 "
            "(bench/hadis_reference.py)\n"
        )
        (TRACES / f"hadis_maf_{peak}qps.txt").write_text(header + shape_trace(peak))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
