"""Reproduce the worker findings of the reliability review against one source tree.

    python bench/reliability_repro.py --out bench/results/reliability-after.json
    git archive HEAD worker | tar -x -C OLD && \\
        python bench/reliability_repro.py --source OLD --out bench/results/reliability-before.json

Each finding is measured only through the worker's CLI and HTTP interface, so the same script
gives the before and after figures. Workers run the tiny CPU models on loopback; every load is
bounded. Takes 4-6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
TOKEN = "repro-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GEN = "/v1/images/generations"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Worker:
    def __init__(
        self, source: Path, model: Path, variant: str, logs: Path, args: list[str], *, nofile: int
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PYTHONPATH": str(source / "worker"),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        command = [
            "prlimit",
            f"--nofile={nofile}:{nofile}",
            sys.executable,
            "-c",
            "from diffcascade_worker.cli import main; main()",
            "serve",
            "--model",
            str(model),
            "--variant",
            variant,
            "--port",
            str(self.port),
            "--threads",
            "1",
            "--log-level",
            "warning",
            *args,
        ]
        self.log = logs / f"{variant}-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 180.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        return False

    def rss_mb(self) -> float:
        try:
            proc = psutil.Process(self.proc.pid)
            procs = [proc, *proc.children(recursive=True)]
            return round(float(max(p.memory_info().rss for p in procs)) / 2**20, 1)
        except psutil.NoSuchProcess:
            return 0.0

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


async def _post(
    client: httpx.AsyncClient, url: str, seed: int, **kwargs: Any
) -> tuple[int, str | None]:
    try:
        response = await client.post(url + GEN, json={"prompt": "a cat", "seed": seed}, **kwargs)
    except httpx.HTTPError as error:
        return -1, type(error).__name__
    try:
        code = response.json().get("error", {}).get("code")
    except ValueError:
        code = "not-json:" + response.headers.get("content-type", "")
    return response.status_code, code


# --- findings ----------------------------------------------------------------------------------


async def stall(worker: Worker) -> dict[str, Any]:
    """SIGSTOP a loaded light worker for 17 s (SLO 5 s), SIGCONT, then ask again."""
    stop = asyncio.Event()

    async def load() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            seed = 0
            while not stop.is_set():
                seed += 1
                await _post(client, worker.url, seed)

    loaders = [asyncio.create_task(load()) for _ in range(2)]
    await asyncio.sleep(2.0)
    os.kill(worker.proc.pid, signal.SIGSTOP)
    await asyncio.sleep(17.0)
    os.kill(worker.proc.pid, signal.SIGCONT)
    stop.set()
    await asyncio.gather(*loaders)
    await asyncio.sleep(1.0)
    async with httpx.AsyncClient(timeout=30) as client:
        first = [await _post(client, worker.url, 1000 + i) for i in range(20)]
        ready_after = (await client.get(worker.url + "/readyz")).status_code
        await asyncio.sleep(20.0)
        later = [await _post(client, worker.url, 2000 + i) for i in range(10)]
    return {
        "refused_right_after": sum(1 for s, _ in first if s != 200),
        "of": len(first),
        "readyz_right_after": ready_after,
        "refused_20s_later": sum(1 for s, _ in later if s != 200),
        "of_later": len(later),
    }


class _Capture(BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        self.seen.append(self.rfile.read(length).decode(errors="replace"))
        body = json.dumps(
            {
                "created": 0,
                "data": [
                    {
                        "b64_json": "Zm9yZ2Vk",
                        "seed": 1,
                        "served_by": "heavy",
                        "deferred": False,
                        "queue_ms": 0,
                        "run_ms": 0,
                        "total_ms": 0,
                    }
                ],
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


async def redirect(worker: Worker) -> dict[str, Any]:
    """Point next_stage_url at a capture server (with a trailing #) and defer everything."""
    server = HTTPServer(("127.0.0.1", 0), _Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    capture = f"http://127.0.0.1:{server.server_port}/capture#"
    async with httpx.AsyncClient(timeout=30) as client:
        put = await client.put(
            worker.url + "/v1/cascade/config",
            json={"next_stage_url": capture, "threshold": 1.0},
            headers=AUTH,
        )
        response = await client.post(worker.url + GEN, json={"prompt": "secret prompt"})
        await client.put(
            worker.url + "/v1/cascade/config",
            json={"next_stage_url": "", "threshold": 0.0},
            headers=AUTH,
        )
    server.shutdown()
    image = response.json()["data"][0] if response.status_code == 200 else {}
    return {
        "put_status": put.status_code,
        "prompts_captured": len(_Capture.seen),
        "forged_image_returned": image.get("b64_json") == "Zm9yZ2Vk",
    }


async def bad_config(worker: Worker) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as client:
        put = await client.put(
            worker.url + "/v1/cascade/config", json={"slo_seconds": 1e-300}, headers=AUTH
        )
        after = await _post(client, worker.url, 5)
        await client.put(worker.url + "/v1/cascade/config", json={"slo_seconds": 5}, headers=AUTH)
    return {"put_status": put.status_code, "next_request_status": after[0]}


async def bodies(worker: Worker) -> dict[str, Any]:
    """Four 100 MB bodies at once; RSS before and its peak while they are sent."""
    before = worker.rss_mb()
    peak = before
    sending = True

    def sample() -> None:
        nonlocal peak
        while sending:
            peak = max(peak, worker.rss_mb())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    blob = b'{"prompt": "' + b"x" * (100 * 2**20) + b'"}'

    async def send(client: httpx.AsyncClient) -> int | str:
        try:
            response = await client.post(
                worker.url + GEN, content=blob, headers={"content-type": "application/json"}
            )
        except httpx.HTTPError as error:
            return type(error).__name__
        return response.status_code

    async with httpx.AsyncClient(timeout=120) as client:
        statuses = await asyncio.gather(*(send(client) for _ in range(4)))
    await asyncio.sleep(1.0)
    sending = False
    sampler.join()
    return {"statuses": list(statuses), "rss_before_mb": before, "rss_peak_mb": peak}


async def connections(worker: Worker, *, idle: int) -> dict[str, Any]:
    """`idle` idle connections (over the worker's 1,024-file limit): probes, then 15 s later."""
    opened: list[socket.socket] = []
    refused = 0
    for _ in range(idle):
        try:
            opened.append(socket.create_connection(("127.0.0.1", worker.port), timeout=2))
        except OSError:
            refused += 1
    await asyncio.sleep(1.0)
    probes: list[int | str] = []
    for _ in range(21):
        try:
            async with httpx.AsyncClient(timeout=3) as client:
                probes.append((await client.get(worker.url + "/healthz")).status_code)
        except httpx.HTTPError as error:
            probes.append(type(error).__name__)
    await asyncio.sleep(15.0)
    closed = 0
    for sock in opened:
        sock.settimeout(0.001)
        try:
            if sock.recv(1) == b"":
                closed += 1
        except (TimeoutError, BlockingIOError):
            pass
        except OSError:
            closed += 1
        sock.close()
    return {
        "idle_opened": len(opened),
        "connect_failed": refused,
        "probes_ok": sum(1 for p in probes if p == 200),
        "probes": len(probes),
        "closed_after_15s": closed,
    }


async def disconnects(worker: Worker) -> dict[str, Any]:
    """30 requests whose clients hang up while queued; how long the next one waits."""
    async with httpx.AsyncClient(timeout=60) as client:
        tasks = [asyncio.create_task(_post(client, worker.url, i)) for i in range(30)]
        await asyncio.sleep(1.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=120) as client:
        status, _ = await _post(client, worker.url, 999)
    return {
        "next_request_status": status,
        "next_request_wait_s": round(time.monotonic() - started, 2),
    }


async def drain(worker: Worker) -> dict[str, Any]:
    """100 accepted requests, SIGTERM with a 1-s drain timeout."""
    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [asyncio.create_task(_post(client, worker.url, i)) for i in range(100)]
        await asyncio.sleep(1.5)
        worker.proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
    code = await asyncio.to_thread(worker.proc.wait, 60)
    kinds = Counter(f"{s}:{c}" for s, c in results)
    return {"responses": dict(kinds), "exit_code": code, "log_tail": worker.log.read_text()[-400:]}


def token_required(source: Path, model: Path, logs: Path) -> dict[str, Any]:
    worker = Worker(source, model, "notoken", logs, [], nofile=4096)
    started = worker.wait_ready(timeout_s=120)
    code = worker.stop() if started else worker.proc.wait(timeout=60)
    return {"started_without_token": started, "exit_code": None if started else code}


# --- driver ------------------------------------------------------------------------------------


async def main_async(
    source: Path, models: Path, logs: Path, only: set[str] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"source": str(source)}

    def wanted(name: str) -> bool:
        return only is None or name in only

    common = ["--token", TOKEN, "--slo-seconds", "5"]
    gate = ["--gate", str(models / "light" / "gate.pt")]
    queue = ["--batch-size", "1", "--queue-capacity", "128"]
    light = Worker(source, models / "light", "light", logs, [*common, *gate], nofile=1024)
    heavy = Worker(source, models / "heavy", "heavy", logs, [*common, *queue], nofile=4096)
    try:
        assert light.wait_ready() and heavy.wait_ready(), "workers did not start"
        if wanted("redirect"):
            out["redirect"] = await redirect(light)
        if wanted("bad_config"):
            out["bad_config"] = await bad_config(light)
        if wanted("bodies"):
            out["bodies"] = await bodies(light)
        if wanted("connections"):
            out["connections"] = await connections(light, idle=1100)
        if wanted("stall"):
            out["stall"] = await stall(light)
        if wanted("stall_heavy"):
            out["stall_heavy"] = await stall(heavy)
        if wanted("disconnects"):
            out["disconnects"] = await disconnects(heavy)
    finally:
        light.stop()
    if not (wanted("drain") or wanted("token")):
        heavy.stop()
        return out
    drain_args = [*common, *queue, "--drain-timeout", "1"]
    drainer = Worker(source, models / "heavy", "drain", logs, drain_args, nofile=4096)
    try:
        assert drainer.wait_ready()
        out["drain"] = await drain(drainer)
    finally:
        drainer.stop()
        heavy.stop()
    out["token"] = await asyncio.to_thread(token_required, source, models / "light", logs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO, help="tree with worker/")
    parser.add_argument("--models", type=Path, default=None, help="tiny models (built if absent)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=None, help="findings to run (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="repro-") as tmp:
        models = args.models or Path(tmp) / "models"
        if not (models / "light").exists():
            from diffcascade_worker.models.tiny import make_tiny_model

            for kind in ("light", "heavy"):
                make_tiny_model(kind, models / kind)
        logs = Path(tmp) / "logs"
        logs.mkdir()
        only = set(args.only) if args.only else None
        result = asyncio.run(main_async(args.source.resolve(), models, logs, only))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
