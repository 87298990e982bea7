"""What the worker's HTTP + queue path costs over calling the pipeline directly.

(a) p50 per-request overhead at batch size 1: sequential requests to a served worker on
    loopback vs direct `TextToImagePipeline.generate` calls of one image (target <= 10 ms).
(b) throughput of 16 concurrent clients against a worker at batch size 8, as a ratio of
    direct batched `generate` calls of 8 images (target >= 0.8).

Both sides use the same tiny pipeline folder, size, steps and one torch thread; direct and
served measurements are interleaved in rounds so machine noise hits both alike. The served
stage has no gate and no next stage, so the comparison is pipeline vs pipeline + serving.

    python -m bench.worker_overhead [--models DIR] [--kinds light,heavy] [--rounds 5]

Prints a table and writes bench/results/worker_overhead.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx

RESULTS = Path(__file__).resolve().parent / "results" / "worker_overhead.json"
PATH_GENERATIONS = "/v1/images/generations"
CLIENTS = 16
BATCH = 8
TARGET_OVERHEAD_MS = 10.0
TARGET_RATIO = 0.8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServedWorker:
    """`diffcascade-worker serve` on loopback, for the duration of a `with` block."""

    def __init__(self, model: Path, *, batch_size: int, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = Path(sys.executable).with_name("diffcascade-worker")
        cli = (
            [str(script)]
            if script.exists()
            else [sys.executable, "-c", "from diffcascade_worker.cli import main; main()"]
        )
        command = [
            *cli, "serve", "--model", str(model), "--variant", "bench",
            "--port", str(self.port), "--threads", "1", "--batch-size", str(batch_size),
            "--queue-capacity", "256", "--slo-seconds", "600", "--log-level", "warning",
            "--token", "bench-token",
        ]  # fmt: skip
        self._log = log.open("wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> ServedWorker:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("worker not ready in 180 s")

    def __exit__(self, *_exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def _load_pipeline(model: Path) -> Any:
    import torch

    torch.set_num_threads(1)
    from diffcascade_worker.models.pipeline import PipelineConfig, TextToImagePipeline
    from diffcascade_worker.models.tiny import read_model_defaults

    found = read_model_defaults(model)
    pipeline = TextToImagePipeline.load(
        PipelineConfig(
            model=str(model),
            steps=found.get("steps", 1),
            guidance_scale=found.get("guidance_scale", 0.0),
            size=found.get("size", 64),
            device="cpu",
        )
    )
    pipeline.warm_up()
    return pipeline


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Client:
    """A keep-alive HTTP/1.1 connection (stdlib: the client should cost less than the server)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self._conn = http.client.HTTPConnection(host, int(port), timeout=300)

    def generate(self, prompt: str, seed: int) -> dict[str, Any]:
        body = json.dumps({"prompt": prompt, "seed": seed})
        self._conn.request(
            "POST", PATH_GENERATIONS, body=body, headers={"Content-Type": "application/json"}
        )
        response = self._conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"worker answered {response.status}: {payload[:200]!r}")
        image: dict[str, Any] = json.loads(payload)["data"][0]
        return image

    def close(self) -> None:
        self._conn.close()


def measure_overhead(
    pipeline: Any, worker: ServedWorker, *, rounds: int, per_round: int
) -> dict[str, Any]:
    """(a): sequential single-image requests vs direct single-image calls, interleaved."""
    direct: list[float] = []
    served: list[float] = []
    server_total: list[float] = []
    client = _Client(worker.url)
    for i in range(5):  # warm both paths
        pipeline.generate([f"warm {i}"], [i])
        client.generate(f"warm {i}", i)
    for r in range(rounds):
        for i in range(per_round):
            seed = r * per_round + i
            started = time.perf_counter()
            pipeline.generate([f"prompt {seed}"], [seed])
            direct.append((time.perf_counter() - started) * 1000)
        for i in range(per_round):
            seed = r * per_round + i
            started = time.perf_counter()
            image = client.generate(f"prompt {seed}", seed)
            served.append((time.perf_counter() - started) * 1000)
            server_total.append(image["total_ms"])
    client.close()
    p50_direct, p50_served = statistics.median(direct), statistics.median(served)
    return {
        "requests": len(served),
        "direct_p50_ms": round(p50_direct, 3),
        "served_p50_ms": round(p50_served, 3),
        "overhead_p50_ms": round(p50_served - p50_direct, 3),
        "served_in_worker_p50_ms": round(statistics.median(server_total), 3),
        "direct_p90_ms": round(_percentile(direct, 0.9), 3),
        "served_p90_ms": round(_percentile(served, 0.9), 3),
        "target_ms": TARGET_OVERHEAD_MS,
    }


def _served_throughput(url: str, *, requests_per_client: int) -> float:
    """Images per second of CLIENTS closed-loop clients, each on its own connection."""
    clients = [_Client(url) for _ in range(CLIENTS)]

    def one_client(index: int) -> int:
        for i in range(requests_per_client):
            clients[index].generate(f"client {index} prompt {i}", index * 10_000 + i)
        return requests_per_client

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        started = time.perf_counter()
        done = sum(pool.map(one_client, range(CLIENTS)))
        elapsed = time.perf_counter() - started
    for client in clients:
        client.close()
    return done / elapsed


def _batch_sizes(worker: ServedWorker) -> tuple[float, float]:
    text = httpx.get(worker.url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith("diffcascade_batch_size_") and not line.startswith("#"):
            name = line.split("{")[0]
            if name in ("diffcascade_batch_size_sum", "diffcascade_batch_size_count"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values.get("diffcascade_batch_size_sum", 0.0), values.get(
        "diffcascade_batch_size_count", 0.0
    )


def measure_throughput(
    pipeline: Any, worker: ServedWorker, *, rounds: int, requests_per_client: int
) -> dict[str, Any]:
    """(b): 16 concurrent clients at batch size 8 vs direct 8-image calls, interleaved."""
    direct_rates: list[float] = []
    served_rates: list[float] = []
    _served_throughput(worker.url, requests_per_client=1)  # connections, first batches
    images_before, batches_before = _batch_sizes(worker)
    calls = max(1, CLIENTS * requests_per_client // BATCH)
    for r in range(rounds):
        started = time.perf_counter()
        for c in range(calls):
            seeds = [r * 100_000 + c * BATCH + k for k in range(BATCH)]
            pipeline.generate([f"prompt {s}" for s in seeds], seeds)
        direct_rates.append(calls * BATCH / (time.perf_counter() - started))
        served_rates.append(_served_throughput(worker.url, requests_per_client=requests_per_client))
    images_after, batches_after = _batch_sizes(worker)
    direct, served = statistics.median(direct_rates), statistics.median(served_rates)
    # Each round pairs a direct and a served run minutes apart at most; the median of the
    # per-round ratios cancels most of the drift of a shared machine.
    ratios = [s / d for s, d in zip(served_rates, direct_rates, strict=True)]
    batches = batches_after - batches_before
    return {
        "clients": CLIENTS,
        "batch_size": BATCH,
        "requests_per_round": CLIENTS * requests_per_client,
        "direct_images_per_s": round(direct, 2),
        "served_images_per_s": round(served, 2),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_of_medians": round(served / direct, 3),
        "round_ratios": [round(r, 3) for r in ratios],
        "mean_served_batch": round((images_after - images_before) / batches, 2) if batches else 0,
        "target_ratio": TARGET_RATIO,
    }


def run_kind(model: Path, *, rounds: int, logs: Path) -> dict[str, Any]:
    pipeline = _load_pipeline(model)
    with ServedWorker(model, batch_size=1, log=logs / f"{model.name}-b1.log") as worker:
        overhead = measure_overhead(pipeline, worker, rounds=rounds, per_round=20)
    with ServedWorker(model, batch_size=BATCH, log=logs / f"{model.name}-b8.log") as worker:
        per_client = 8 if "heavy" in model.name else 24
        throughput = measure_throughput(
            pipeline, worker, rounds=rounds, requests_per_client=per_client
        )
    return {"overhead": overhead, "throughput": throughput, "size": pipeline.config.size,
            "steps": pipeline.config.steps}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=None, help="folder with light/ heavy/")
    parser.add_argument("--kinds", default="light,heavy")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="worker-bench-"))
    models = args.models or work / "models"
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if args.models is None:
        from diffcascade_worker.models.tiny import make_tiny_model

        for kind in kinds:
            make_tiny_model(kind, models / kind)  # type: ignore[arg-type]
    results = {kind: run_kind(models / kind, rounds=args.rounds, logs=work) for kind in kinds}
    report = {
        "benchmark": "worker_overhead",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch_threads": 1,
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"{'model':<7} {'size':>4} {'steps':>5} | {'direct p50':>10} {'served p50':>10} "
          f"{'overhead':>9} | {'direct img/s':>12} {'served img/s':>12} {'ratio':>6} "
          f"{'batch':>5}")  # fmt: skip
    for kind, r in results.items():
        o, t = r["overhead"], r["throughput"]
        print(
            f"{kind:<7} {r['size']:>4} {r['steps']:>5} | {o['direct_p50_ms']:>8.2f}ms "
            f"{o['served_p50_ms']:>8.2f}ms {o['overhead_p50_ms']:>7.2f}ms | "
            f"{t['direct_images_per_s']:>12.1f} {t['served_images_per_s']:>12.1f} "
            f"{t['ratio']:>6.2f} {t['mean_served_batch']:>5.1f}"
        )
    print(f"targets: overhead <= {TARGET_OVERHEAD_MS} ms, ratio >= {TARGET_RATIO}; "
          f"wrote {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
