"""SD v1.5's UNet at its real size on this CPU: parameters, memory, one forward pass.

Built from the config in bench/real_architectures/sd-v1.5.json with random weights (the
weights do not change the cost), float32, then one denoising forward at 32x32 latents
(a 256 px image; 64x64 is 512 px) with a CLIP-L-shaped text context. It shows what the
tiny test models stand in for: a real UNet is ~860 M parameters and seconds per step on a
CPU, so real models need the GPU (bench/gpu_real_architectures.py) and tests use tiny ones.

    .venv/bin/python bench/sd15_unet_cpu.py [--latent 32] [--batch 1] [--threads 1]

Writes bench/results/sd15_unet_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "real_architectures" / "sd-v1.5.json"
RESULT = HERE / "results" / "sd15_unet_cpu.json"


def rss_mb() -> float:
    """Resident set size now (Linux /proc), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (px / 8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    import diffusers
    import torch

    torch.set_num_threads(args.threads)
    config: dict[str, Any] = json.loads(CONFIG.read_text())["components"]["unet"]["config"]
    start_rss = rss_mb()
    started = time.perf_counter()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**config).eval()
    built_s = time.perf_counter() - started
    params = sum(p.numel() for p in unet.parameters())
    built_rss = rss_mb()
    print(f"built in {built_s:.1f} s: {params:,} parameters; RSS {built_rss:.0f} MB", flush=True)

    sample = torch.randn(args.batch, 4, args.latent, args.latent)
    context = torch.randn(args.batch, 77, int(config["cross_attention_dim"]))
    timestep = torch.tensor([999] * args.batch)
    forwards = []
    with torch.inference_mode():
        for _ in range(2):  # the first call pays one-off set-up; the second is the steady cost
            t = time.perf_counter()
            out = unet(sample, timestep, encoder_hidden_states=context).sample
            forwards.append(time.perf_counter() - t)
            print(f"forward {args.latent}x{args.latent} latents, batch {args.batch}: "
                  f"{forwards[-1]:.2f} s; RSS {rss_mb():.0f} MB", flush=True)  # fmt: skip
    assert out.shape == sample.shape
    result = {
        "what": "SD v1.5 UNet (config: bench/real_architectures/sd-v1.5.json), random weights",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_1min": round(os.getloadavg()[0], 2),  # others' work shares these CPUs
        "threads": args.threads,
        "dtype": "float32",
        "parameters": params,
        "bytes_fp32": params * 4,
        "build_seconds": round(built_s, 2),
        "rss_mb_at_start": round(start_rss),
        "rss_mb_after_build": round(built_rss),
        "peak_rss_mb": round(peak_rss_mb()),
        "latent": args.latent,
        "image_px": args.latent * 8,
        "batch": args.batch,
        "forward_seconds_first": round(forwards[0], 2),
        "forward_seconds": round(forwards[1], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
