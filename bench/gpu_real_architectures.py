"""Batch latency and peak memory of the DiffServe paper's five models at their real sizes.

Each architecture is built from the configs in bench/real_architectures/ with random weights
(no model hub is needed: random weights run the same kernels as trained ones), in fp16, at its
real resolution and step count, and timed as the worker runs it: one diffusers pipeline call
per batch (text encoders, every denoising step, the VAE decode), from call to images in memory.
The table is written in the format of the bundled A100 reference
(operator/diffcascade_operator/reference/latency_a100_ms.csv: model,batch_size,latency_ms),
with the ratio to it beside it.

    python3 bench/gpu_real_architectures.py --out results/ --budget-s 540
    python3 bench/gpu_real_architectures.py --out /tmp/smoke --smoke      # CPU, tiny configs

Order: SD-Turbo, SD v1.5, SDXS, SDXL-Lightning, SDXL, each at batch 1, 2, 4, 8, 16. Before a
measurement the script predicts its cost from the last one and skips it (and the larger batches
of that model) when it would not fit the time budget; results are rewritten after every
measurement (CSV + markdown + JSON), so a killed run still leaves its table.

Every model is timed at its real step count (the whole run takes about 7 minutes on an H200).
`--extrapolate` times the 50-step models (SD v1.5, SDXL) at two smaller step counts instead and
extrapolates linearly to 50 (latency = fixed + steps x per-step), which the output marks: about
twice as fast, but on an H200 it was off by up to 43 % at batches 1-2, where a step is
launch-bound rather than compute-bound. SDXL-Lightning is
SDXL base with a UNet of the same architecture: with random weights it is timed on the SDXL
pipeline with Euler on trailing timesteps, 2 steps, no guidance.

Imports only torch, diffusers, transformers, numpy and the standard library (not diffcascade).
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "real_architectures"
REFERENCE = HERE.parent / "operator" / "diffcascade_operator" / "reference" / "latency_a100_ms.csv"
ORDER = ("sd-turbo", "sd-v1.5", "sdxs", "sdxl-lightning", "sdxl")
BATCH_SIZES = (1, 2, 4, 8, 16)
#: Step counts timed for a many-step model, extrapolated to its real count.
EXTRAPOLATE_FROM = (2, 6)
EXTRAPOLATE_ABOVE = 10  # models with more steps than this are extrapolated
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"


def log(start: float, message: str) -> None:
    print(f"[{time.monotonic() - start:7.1f} s] {message}", flush=True)


# --- building pipelines from the bundled configs ---------------------------------------------


def byte_tokenizer(transformers: Any) -> Any:
    """A CLIP tokenizer over a byte-level vocabulary: no hub files, prompts padded to 77 like
    the real one, so the text encoders see real-shaped inputs."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77
    )


def load_config(name: str, *, smoke: bool) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((CONFIGS / f"{name}.json").read_text())
    base_name = doc.get("same_architecture_as")
    if base_name:
        base = load_config(base_name, smoke=smoke)
        base["components"]["scheduler"] = {
            "class": doc["scheduler"]["class"],
            "config": {**base["components"]["scheduler"]["config"], **doc["scheduler"]["config"]},
        }
        return {**base, **{k: v for k, v in doc.items() if k not in ("scheduler",)}}
    if smoke:
        for component, override in doc.get("smoke", {}).items():
            doc["components"][component]["config"].update(override)
    return doc


def build(doc: dict[str, Any], *, device: str, dtype: Any) -> tuple[Any, dict[str, int]]:
    """The pipeline of `doc` with random weights on `device` in `dtype`; parameters per part."""
    import diffusers
    import torch
    import transformers

    tokenizer = byte_tokenizer(transformers)
    eos, bos = len(tokenizer) - 1, len(tokenizer) - 2
    parts: dict[str, Any] = {}
    params: dict[str, int] = {}
    torch.manual_seed(0)
    for name, spec in doc["components"].items():
        config = dict(spec["config"])
        if name == "scheduler":
            parts[name] = getattr(diffusers, spec["class"]).from_config(config)
            continue
        with torch.device(device):
            if spec["class"].startswith("CLIPText"):
                config.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
                model = getattr(transformers, spec["class"])(transformers.CLIPTextConfig(**config))
            else:
                model = getattr(diffusers, spec["class"])(**config)
        parts[name] = model.to(dtype=dtype).eval()
        params[name] = sum(p.numel() for p in model.parameters())
    pipeline_class = getattr(diffusers, doc["pipeline"])
    if doc["pipeline"] == "StableDiffusionXLPipeline":
        pipe = pipeline_class(
            tokenizer=tokenizer,
            tokenizer_2=copy.deepcopy(tokenizer),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
            **parts,
        )
    else:
        pipe = pipeline_class(
            tokenizer=tokenizer,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **parts,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe, params


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    batch_size: int
    latency_ms: float | None
    status: str  # measured, extrapolated, skipped: ..., oom, error: ...
    steps: int
    steps_timed: str = ""
    runs_ms: dict[str, list[float]] = field(default_factory=dict)
    peak_mem_gib: float | None = None
    reference_a100_ms: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.latency_ms is None or not self.reference_a100_ms:
            return None
        return self.latency_ms / self.reference_a100_ms


def run_once(
    pipe: Any, doc: dict[str, Any], *, batch: int, steps: int, size: int, device: str
) -> float:
    import torch

    generators = [torch.Generator(device="cpu").manual_seed(i) for i in range(batch)]
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = pipe(
            prompt=[PROMPT] * batch,
            num_inference_steps=steps,
            guidance_scale=doc["guidance_scale"],
            height=size,
            width=size,
            generator=generators,
            output_type="pt",
        )
        out.images.to("cpu")
    sync(device)
    return (time.perf_counter() - started) * 1000.0


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    pipe: Any,
    doc: dict[str, Any],
    *,
    batch: int,
    size: int,
    device: str,
    repeats: int,
    extrapolate: bool,
) -> tuple[float, str, str, dict[str, list[float]]]:
    """(latency ms at the real step count, status, steps timed, raw runs by step count)."""
    steps = int(doc["steps"])
    timed = EXTRAPOLATE_FROM if extrapolate and steps > EXTRAPOLATE_ABOVE else (steps,)

    def once(k: int) -> float:
        return run_once(pipe, doc, batch=batch, steps=k, size=size, device=device)

    once(timed[0])  # warm-up: first-call costs (kernel selection, allocator growth) land here
    runs = {str(k): [once(k) for _ in range(repeats)] for k in timed}
    medians = {int(k): statistics.median(v) for k, v in runs.items()}
    if len(timed) == 1:
        return medians[steps], "measured", str(steps), runs
    (k1, t1), (k2, t2) = sorted(medians.items())
    if t2 <= t1:  # noise beat the extra steps: no per-step cost to extrapolate from
        return t2 * steps / k2, "extrapolated (noisy: scaled)", f"{k1},{k2}", runs
    per_step = (t2 - t1) / (k2 - k1)
    fixed = t1 - per_step * k1
    return fixed + per_step * steps, "extrapolated", f"{k1},{k2}", runs


def predicted_cost_s(row: Row | None, doc: dict[str, Any], batch: int, repeats: int) -> float:
    """Seconds a measurement at `batch` will take, from the last one of the same model
    (latency assumed linear in the batch: an upper bound once the GPU is saturated)."""
    if row is None or row.latency_ms is None:
        return 0.0
    scale = batch / row.batch_size
    if len(row.runs_ms) > 1:  # timed at two step counts (--extrapolate)
        timed = [int(k) for k in row.runs_ms]
        per_run = [statistics.median(row.runs_ms[str(k)]) * scale for k in timed]
        total_ms = per_run[0] + sum(p * repeats for p in per_run)
    else:
        total_ms = row.latency_ms * scale * (1 + repeats)
    return total_ms / 1000.0


# --- output -----------------------------------------------------------------------------------


def read_reference() -> dict[tuple[str, int], float]:
    table: dict[tuple[str, int], float] = {}
    if REFERENCE.is_file():
        with REFERENCE.open() as handle:
            for row in csv.DictReader(handle):
                table[(row["model"], int(row["batch_size"]))] = float(row["latency_ms"])
    return table


def write_outputs(out: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gpu = meta.get("device_name", "device")
    with (out / "latency_ms.csv").open("w", newline="") as handle:  # the reference's format
        writer = csv.writer(handle)
        writer.writerow(["model", "batch_size", "latency_ms"])
        for row in rows:
            if row.latency_ms is not None:
                writer.writerow([row.model, row.batch_size, round(row.latency_ms)])
    with (out / "details.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["model", "batch_size", "latency_ms", "status", "steps", "steps_timed",
             "reference_a100_ms", "ratio_to_a100", "peak_mem_gib"]
        )  # fmt: skip
        for row in rows:
            writer.writerow(
                [
                    row.model,
                    row.batch_size,
                    "" if row.latency_ms is None else round(row.latency_ms, 1),
                    row.status,
                    row.steps,
                    row.steps_timed,
                    "" if row.reference_a100_ms is None else row.reference_a100_ms,
                    "" if row.ratio is None else round(row.ratio, 3),
                    "" if row.peak_mem_gib is None else round(row.peak_mem_gib, 2),
                ]
            )
    lines = [
        f"# Batch latency of the paper's models on {gpu} ({meta.get('dtype')}, random weights)",
        "",
        f"{meta.get('when', '')}; torch {meta.get('torch')}, diffusers {meta.get('diffusers')}, "
        f"transformers {meta.get('transformers')}; budget {meta.get('budget_s')} s"
        + (" (SMOKE: tiny configs, not real sizes)" if meta.get("smoke") else ""),
        "",
        "| model | batch | latency ms | A100 ms (DiffServe) | ratio | peak GiB | how |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        how = row.status
        if row.status.startswith("extrapolated"):
            how = f"timed at {row.steps_timed} steps, {row.status} to {row.steps}"
        elif row.status == "measured":
            how = f"{row.steps} step(s)"
        lines.append(
            f"| {row.model} | {row.batch_size} | "
            f"{'' if row.latency_ms is None else f'{row.latency_ms:.0f}'} | "
            f"{'' if row.reference_a100_ms is None else f'{row.reference_a100_ms:.0f}'} | "
            f"{'' if row.ratio is None else f'{row.ratio:.2f}'} | "
            f"{'' if row.peak_mem_gib is None else f'{row.peak_mem_gib:.1f}'} | {how} |"
        )
    params = meta.get("parameters", {})
    if params:
        lines += ["", "Parameters (millions) of what was built:", ""]
        for model, parts in params.items():
            text = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in parts.items())
            lines.append(f"- {model}: {text}")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "run.json").write_text(
        json.dumps({**meta, "rows": [{**asdict(r), "ratio": r.ratio} for r in rows]}, indent=1)
        + "\n"
    )


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables")
    parser.add_argument(
        "--budget-s", type=float, default=540.0, help="stop starting work after this"
    )
    parser.add_argument("--models", default=",".join(ORDER), help="comma-separated, in order")
    parser.add_argument("--batch-sizes", default=None, help="default 1,2,4,8,16 (smoke: 1,2)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs (default 3; 2 for 50-step)"
    )
    parser.add_argument("--device", default=None, help="default cuda (smoke: cpu)")
    parser.add_argument("--dtype", default=None, help="default float16 (smoke: float32)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny configs at 64 px: the same code path"
    )
    parser.add_argument(
        "--extrapolate",
        action="store_true",
        help="time the 50-step models at 2 and 6 steps and extrapolate (faster, less exact)",
    )
    args = parser.parse_args(argv)
    start = time.monotonic()

    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    device = args.device or ("cpu" if args.smoke else "cuda")
    dtype = getattr(torch, args.dtype or ("float32" if args.smoke else "float16"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: use --smoke (CPU) or --device cpu", file=sys.stderr)
        return 2
    sizes = [
        int(b) for b in (args.batch_sizes or ("1,2" if args.smoke else "1,2,4,8,16")).split(",")
    ]
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if not (CONFIGS / f"{m}.json").is_file()]
    if unknown:
        print(f"unknown models {unknown}; known: {', '.join(ORDER)}", file=sys.stderr)
        return 2
    reference = read_reference()
    meta: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "budget_s": args.budget_s,
        "smoke": args.smoke,
        "parameters": {},
    }
    log(
        start,
        f"{meta['device_name']} | torch {torch.__version__} diffusers {diffusers.__version__} "
        f"transformers {transformers.__version__} | {meta['dtype']} | budget {args.budget_s:.0f} s",
    )
    if args.smoke:
        torch.set_num_threads(1)  # steadier on a shared CPU
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows: list[Row] = []
    built: tuple[str, Any] | None = None  # (architecture, pipe): Lightning reuses SDXL's
    pipe: Any = None
    for name in models:
        doc = load_config(name, smoke=args.smoke)
        size = 64 if args.smoke else int(doc["resolution"])
        steps = int(doc["steps"])
        repeats = args.repeats or (2 if steps > EXTRAPOLATE_ABOVE else 3)
        arch = doc.get("same_architecture_as") or name
        if args.budget_s - (time.monotonic() - start) < 10:
            rows += [Row(name, b, None, "skipped: budget", steps) for b in sizes]
            log(start, f"{name}: skipped (budget)")
            write_outputs(args.out, rows, meta)
            continue
        if built is None or built[0] != arch:
            built = pipe = None  # free the previous model before building the next
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            t = time.monotonic()
            try:
                pipe, params = build(doc, device=device, dtype=dtype)
            except Exception as error:  # say so in the table and go on with the next model
                reason = f"error: build: {type(error).__name__}: {error}"[:200]
                rows += [Row(name, b, None, reason, steps) for b in sizes]
                log(start, f"{name}: {reason}")
                write_outputs(args.out, rows, meta)
                continue
            built = (arch, pipe)
            meta["parameters"][arch] = params
            log(
                start,
                f"{name}: built {arch} in {time.monotonic() - t:.1f} s "
                f"({sum(params.values()) / 1e6:.0f} M parameters)",
            )
        pipe = built[1]
        pipe.scheduler = getattr(diffusers, doc["components"]["scheduler"]["class"]).from_config(
            doc["components"]["scheduler"]["config"]
        )
        last: Row | None = None
        stop_reason = ""
        for batch in sizes:
            row = Row(
                name,
                batch,
                None,
                "",
                steps,
                reference_a100_ms=reference.get((doc["reference"], batch)),
            )
            left = args.budget_s - (time.monotonic() - start)
            cost = predicted_cost_s(last, doc, batch, repeats)
            if stop_reason:
                row.status = stop_reason
            elif cost > left:
                row.status = stop_reason = (
                    f"skipped: budget (needs ~{cost:.0f} s, {left:.0f} s left)"
                )
            else:
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                t = time.monotonic()
                try:
                    latency, status, timed, runs = measure(
                        pipe,
                        doc,
                        batch=batch,
                        size=size,
                        device=device,
                        repeats=repeats,
                        extrapolate=args.extrapolate,
                    )
                except torch.cuda.OutOfMemoryError:
                    row.status = stop_reason = "oom"
                    torch.cuda.empty_cache()
                except Exception as error:  # keep the table going: say what failed
                    row.status = stop_reason = f"error: {type(error).__name__}: {error}"[:200]
                else:
                    row.latency_ms, row.status, row.steps_timed, row.runs_ms = (
                        latency,
                        status,
                        timed,
                        runs,
                    )
                    if device.startswith("cuda"):
                        row.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
                    last = row
                ratio = f" ratio {row.ratio:.2f}" if row.ratio is not None else ""
                log(
                    start,
                    f"{name} batch {batch}: {row.status} "
                    + (f"{row.latency_ms:.0f} ms{ratio}" if row.latency_ms is not None else "")
                    + (f", peak {row.peak_mem_gib:.1f} GiB" if row.peak_mem_gib else "")
                    + f" ({time.monotonic() - t:.1f} s)",
                )
            if row.status.startswith("skipped"):
                log(start, f"{name} batch {batch}: {row.status}")
            rows.append(row)
            write_outputs(args.out, rows, meta)
    log(
        start,
        f"done: {sum(r.latency_ms is not None for r in rows)} of {len(rows)} measured; "
        f"tables in {args.out}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
