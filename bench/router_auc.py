"""Pre-generation router quality: out-of-sample AUC of predicting the gate's escalation, and the
light-stage GPU time a router share saves, for HADIS's rule, the learned router and random.

Label: a prompt is escalated at c when its light-stage gate confidence is below the
c-percentile of the prompt set's confidences (c as HADIS reads it). Scorers, each scored on
the same k folds (train on k-1, score the held-out fold; mean +- sd over folds):

- `rule`: HADIS's `isHardByRouter` weights on its eight prompt features, z-scored with the
  training fold's mean and sample sd. The weights themselves were chosen by HADIS's authors
  on the HADIS prompts (best of 400 candidates, in-sample), so on that set the rule is not out
  of sample; it is the comparison the issue asks for all the same.
- `learned`: the router's product learner (hashed word/char n-grams, online logistic
  regression on the hardness quantile of the gate's confidence), one pass over the training
  fold in random order, default settings (nothing tuned on these folds).
- `learned-binary`: the same model trained on the escalation label at that c instead.
- `features-linear`: the same online logistic model on HADIS's eight features (learned weights
  instead of HADIS's).
- `random`: uniform random scores.

Two fold schemes: `random` (a seeded permutation) and `blocked` (contiguous blocks of the
file). DiffusionDB's prompts come in user sessions with near-duplicate neighbours, so random
folds let a text model score a held-out prompt by its neighbour in the training fold; the
blocked folds are the honest ones there.

GPU time saved at router share r: the share of prompts the router sends straight to heavy
that the gate would have escalated anyway (light work avoided without changing what is
served), times the light model's per-image time at batch 1; the share routed that the gate
would have kept on light (what routing changes) is printed beside it. A perfect router saves
min(r, c), a random one r x c. No FID is credited to any router: no images exist to measure it.

Prompt sets:
- DiffServe's 5,000 DiffusionDB prompts (`../shared/data/diffserve/prompts/`) with the
  bundled sd-turbo confidences (`reference/confidence_sd-turbo.txt`). HADIS's features are
  approximated (`routing.hadis_features`: no spaCy, wordfreq or concreteness norms here).
- HADIS's 5,000 ImageNet captions with its own eight features and the confidences of its light
  models 0-2 (column 1 of `scores_model_k.txt`, 4-image means), bundled in `reference/`
  (`hadis_prompts.txt`, `hadis_prompt_features.csv`, `confidence_hadis-<variant>.txt`).

    .venv/bin/python bench/router_auc.py [--folds 5] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from diffcascade_operator.profiles import reference_latency
from diffcascade_worker.routing.features import SparseVector
from diffcascade_worker.routing.hadis_features import approximate_features
from diffcascade_worker.routing.learner import OnlineLogistic, auc
from diffcascade_worker.routing.scorers import HADIS_WEIGHTS, LearnedScorer

ROOT = Path(__file__).resolve().parent.parent
DIFFUSIONDB = ROOT.parent / "shared" / "data" / "diffserve" / "prompts" / "diffusiondb_first5k.txt"
SDTURBO = ROOT / "operator" / "diffcascade_operator" / "reference" / "confidence_sd-turbo.txt"
CS = (0.25, 0.5, 0.75)
SHARES = (0.1, 0.2, 0.3)
#: HADIS's per-image light times (`config.py`, L40S, batch 1, seconds), by model index.
HADIS_LIGHT_S = {0: 0.5, 1: 1.3, 2: 13.0}
Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: list[str]
    features: Floats  # HADIS's eight features (exact or approximated), one row per prompt
    confidences: dict[str, Floats]  # light model -> per-prompt gate confidence
    light_seconds: dict[str, float]  # light model -> per-image seconds at batch 1
    features_note: str


def load_diffusiondb() -> PromptSet:
    prompts = DIFFUSIONDB.read_text(encoding="utf-8", errors="replace").splitlines()
    confidences = np.loadtxt(SDTURBO)
    if len(prompts) != len(confidences):
        raise SystemExit(f"{len(prompts)} prompts but {len(confidences)} confidences")
    features = np.array([approximate_features(p) for p in prompts], dtype=np.float64)
    return PromptSet(
        "diffusiondb-5k",
        prompts,
        features,
        {"sd-turbo": confidences},
        {"sd-turbo": reference_latency("sd-turbo")[1] / 1000.0},
        "approximated (routing.hadis_features)",
    )


#: HADIS's prompt set as bundled (reference/ATTRIBUTION.md): its 5,000 ImageNet captions, their
#: eight router features, and each light variant's per-prompt gate confidence (the mean P(real)
#: of its four images), by model index.
REFERENCE = ROOT / "operator" / "diffcascade_operator" / "reference"
HADIS_LIGHT_NAMES = {0: "sdxl-lightning", 1: "sd35-large-turbo", 2: "sd35-medium"}


def load_hadis(reference: Path = REFERENCE) -> PromptSet:
    """HADIS's prompts, features and confidences from the bundled reference data."""
    prompts = (reference / "hadis_prompts.txt").read_text(encoding="utf-8").splitlines()
    with (reference / "hadis_prompt_features.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    features = np.array([[float(v) for v in row[1:9]] for row in rows], dtype=np.float64)
    confidences = {
        f"model-{k}": np.loadtxt(reference / f"confidence_hadis-{name}.txt", comments="#")
        for k, name in HADIS_LIGHT_NAMES.items()
    }
    if not len(prompts) == len(features) == 5000:
        raise ValueError(f"{len(prompts)} prompts, {len(features)} feature rows: expected 5000")
    return PromptSet(
        "hadis-imagenet-5k",
        prompts,
        features,
        confidences,
        {f"model-{k}": s for k, s in HADIS_LIGHT_S.items()},
        "HADIS's own (prompt_features.csv)",
    )


# --- scorers: (prompt set, train indices, test indices, confidences, c) -> test scores ----------

Scorer = Callable[[PromptSet, np.ndarray, np.ndarray, Floats, float, int], Floats]


def _hardness(confidences: Floats) -> Floats:
    """1 - the confidence's quantile: 1 for the least confident prompt."""
    ranks = np.argsort(np.argsort(confidences, kind="mergesort"), kind="mergesort")
    return 1.0 - (ranks + 0.5) / len(confidences)


def rule(ps: PromptSet, train: np.ndarray, test: np.ndarray, *_: object) -> Floats:
    mean = ps.features[train].mean(axis=0)
    std = ps.features[train].std(axis=0, ddof=1)
    std = np.where(std > 0, std, 1.0)
    return np.asarray(((ps.features[test] - mean) / std) @ np.array(HADIS_WEIGHTS))


def learned(
    ps: PromptSet, train: np.ndarray, test: np.ndarray, conf: Floats, _c: float, seed: int
) -> Floats:
    order = np.random.default_rng(seed).permutation(train)
    hardness = dict(zip(train.tolist(), _hardness(conf[train]).tolist(), strict=True))
    scorer = LearnedScorer()
    scorer.fit_quantiles([ps.prompts[i] for i in order], [hardness[int(i)] for i in order])
    return np.array([scorer.score(ps.prompts[i]) for i in test])


def learned_binary(
    ps: PromptSet, train: np.ndarray, test: np.ndarray, conf: Floats, c: float, seed: int
) -> Floats:
    order = np.random.default_rng(seed).permutation(train)
    cut = np.quantile(conf[train], c)
    scorer = LearnedScorer()
    scorer.fit_quantiles([ps.prompts[i] for i in order], (conf[order] < cut).astype(float))
    return np.array([scorer.score(ps.prompts[i]) for i in test])


def features_linear(
    ps: PromptSet, train: np.ndarray, test: np.ndarray, conf: Floats, _c: float, seed: int
) -> Floats:
    mean = ps.features[train].mean(axis=0)
    std = ps.features[train].std(axis=0, ddof=1)
    std = np.where(std > 0, std, 1.0)
    z = (ps.features - mean) / std
    index = np.arange(z.shape[1], dtype=np.int64)
    model = OnlineLogistic(z.shape[1], learning_rate=0.1)
    hardness = dict(zip(train.tolist(), _hardness(conf[train]).tolist(), strict=True))
    for _ in range(3):
        for i in np.random.default_rng(seed).permutation(train):
            model.update(SparseVector(index, z[i]), hardness[int(i)])
    return np.array([model.margin(SparseVector(index, z[i])) for i in test])


def random_scores(
    _ps: PromptSet, _train: np.ndarray, test: np.ndarray, _conf: Floats, _c: float, seed: int
) -> Floats:
    return np.random.default_rng(seed + 7919).random(len(test))


SCORERS: dict[str, Scorer] = {
    "rule": rule,
    "learned": learned,
    "learned-binary": learned_binary,
    "features-linear": features_linear,
    "random": random_scores,
}
C_DEPENDENT = {"learned-binary"}


def folds(n: int, k: int, scheme: str, seed: int = 0) -> list[np.ndarray]:
    if scheme == "blocked":
        assignment = np.arange(n) * k // n
    else:
        assignment = np.random.default_rng(seed).permutation(n) % k
    return [np.where(assignment == f)[0] for f in range(k)]


def saved_and_changed(scores: Floats, escalated: np.ndarray, share: float) -> tuple[float, float]:
    """Shares of the fold: routed and escalated anyway (saved), routed and not (changed)."""
    cut = np.sort(scores)[max(int(len(scores) * (1 - share)) - 1, 0)]  # rule.cut_score
    routed = scores >= cut
    return float(np.mean(routed & escalated)), float(np.mean(routed & ~escalated))


def pairing_check(ps: PromptSet, conf: Floats) -> dict[str, float]:
    """Do the confidences belong to these prompts? DiffServe's worker seeds a prompt's images
    by position (`get_inputs`: seeds 0..b-1), so if the stored scores were made that way,
    identical prompts get (nearly) the same confidence; values unrelated to the prompts differ
    by 1/3 in rank on average."""
    rank = np.argsort(np.argsort(conf, kind="mergesort")) / len(conf)
    seen: dict[str, int] = {}
    gaps = []
    for i, prompt in enumerate(ps.prompts):
        key = prompt.strip()
        if key in seen:
            gaps.append(abs(rank[i] - rank[seen[key]]))
        seen[key] = i
    return {"duplicate_pairs": len(gaps), "mean_rank_gap": float(np.mean(gaps)) if gaps else 0.0}


def evaluate(ps: PromptSet, *, k: int, schemes: Sequence[str]) -> dict[str, object]:
    out: dict[str, object] = {"features": ps.features_note, "prompts": len(ps.prompts)}
    out["pairing"] = {light: pairing_check(ps, conf) for light, conf in ps.confidences.items()}
    for light, conf in ps.confidences.items():
        for scheme in schemes:
            parts = folds(len(conf), k, scheme)
            cache: dict[tuple[str, float, int], Floats] = {}
            table: dict[str, dict[str, object]] = {}
            for name, scorer in SCORERS.items():
                per_c: dict[str, object] = {}
                for c in CS:
                    aucs, saved = [], {r: [] for r in SHARES}
                    changed: dict[float, list[float]] = {r: [] for r in SHARES}
                    cut = np.quantile(conf, c)
                    for f, test in enumerate(parts):
                        train = np.sort(np.concatenate([p for g, p in enumerate(parts) if g != f]))
                        key = (name, c if name in C_DEPENDENT else -1.0, f)
                        if key not in cache:
                            cache[key] = scorer(ps, train, test, conf, c, f)
                        scores = cache[key]
                        escalated = conf[test] < cut
                        aucs.append(auc(scores, escalated))
                        for r in SHARES:
                            s, ch = saved_and_changed(scores, escalated, r)
                            saved[r].append(s)
                            changed[r].append(ch)
                    per_c[f"c={c:g}"] = {
                        "auc_mean": float(np.mean(aucs)),
                        "auc_sd": float(np.std(aucs, ddof=1)),
                        "saved_share": {f"r={r:g}": float(np.mean(saved[r])) for r in SHARES},
                        "changed_share": {f"r={r:g}": float(np.mean(changed[r])) for r in SHARES},
                    }
                table[name] = per_c
            out[f"{light}/{scheme}"] = {
                "light_seconds_per_image": ps.light_seconds[light],
                "scorers": table,
            }
    return out


def print_tables(name: str, result: dict[str, object]) -> None:
    print(f"\n## {name}: {result['prompts']} prompts, HADIS features {result['features']}")
    for light, check in result["pairing"].items():  # type: ignore[attr-defined]
        if not check["duplicate_pairs"]:
            continue
        print(
            f"pairing check ({light}): {check['duplicate_pairs']} pairs of identical prompts "
            f"differ by {check['mean_rank_gap']:.3f} in confidence rank on average "
            "(1/3 if the confidences are unrelated to the prompts, ~0 if they belong to them)"
        )
    for key, block in result.items():
        if not isinstance(block, dict) or "scorers" not in block:
            continue
        scorers: dict[str, dict[str, dict[str, object]]] = block["scorers"]  # type: ignore[assignment]
        print(f"\n### {key}: AUC of the escalation (mean +- sd over folds)")
        print(f"{'scorer':<16}" + "".join(f"{'c=' + format(c, 'g'):>18}" for c in CS))
        for scorer, per_c in scorers.items():
            cells = []
            for c in CS:
                cell = per_c[f"c={c:g}"]
                cells.append(f"{cell['auc_mean']:.3f} +- {cell['auc_sd']:.3f}")  # type: ignore[index]
            print(f"{scorer:<16}" + "".join(f"{cell:>18}" for cell in cells))
        seconds = float(block["light_seconds_per_image"])  # type: ignore[arg-type]
        print(
            f"\n{key}: light GPU time saved per 1,000 prompts at c=0.5 (light image "
            f"{seconds:g} s at batch 1); in brackets the share whose serving changes"
        )
        print(f"{'scorer':<16}" + "".join(f"{'r=' + format(r, 'g'):>22}" for r in SHARES))
        for scorer, per_c in scorers.items():
            cell = per_c["c=0.5"]
            row = ""
            for r in SHARES:
                s = cell["saved_share"][f"r={r:g}"]  # type: ignore[index]
                ch = cell["changed_share"][f"r={r:g}"]  # type: ignore[index]
                row += f"{s * 1000 * seconds:>11.1f} s [{ch:>5.1%}]"
            print(f"{scorer:<16}{row}")
        print(f"{'perfect':<16}" + "".join(
            f"{min(r, 0.5) * 1000 * seconds:>11.1f} s [{max(0.0, r - 0.5):>5.1%}]" for r in SHARES
        ))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--schemes", default="blocked,random")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    schemes = [s for s in args.schemes.split(",") if s]
    started = time.perf_counter()
    results: dict[str, object] = {}
    sets = [load_diffusiondb(), load_hadis()]
    for ps in sets:
        results[ps.name] = evaluate(ps, k=args.folds, schemes=schemes)
        print_tables(ps.name, results[ps.name])  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.0f} s")
    if args.out is not None:
        document = {
            "benchmark": "router_auc",
            "folds": args.folds,
            "cs": CS,
            "shares": SHARES,
            "seconds": round(elapsed, 1),
            "machine": platform.machine(),
            "python": sys.version.split()[0],
            "results": results,
        }
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
