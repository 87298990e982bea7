"""Chaos harness: a light + heavy cascade under `diffcascade up`, Poisson load, and faults.

Shared by the chaos suite (`tests/reliability/test_chaos.py`, a few minutes) and the 10-minute
soak (`bench/soak.py`). Everything runs on loopback with bounded load: `Load` keeps at most
`max_in_flight` requests open and stops at its deadline; every fault is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

READY = re.compile(r"ready at (http://\S+)")
GEN = "/v1/images/generations"
#: Answers a request may get besides 200: each in the OpenAI error envelope with this code.
DOCUMENTED = {
    400: {"invalid_value", "invalid_json", "missing_required_parameter", "invalid_type"},
    413: {"payload_too_large"},
    429: {"queue_full"},
    502: {"bad_gateway"},  # the router: a replica went away mid-request
    503: {"not_ready", "deadline_exceeded", "no_replica"},
    504: {"timeout"},
}


def cascade_doc(models: dict[str, Path], *, slo_seconds: float = 3.0) -> dict[str, Any]:
    """One light and one heavy replica; MaxThreshold at low load defers (nearly) everything,
    so both stages see traffic."""
    light, heavy = models["light"], models["heavy"]
    return {
        "apiVersion": "diffcascade.dev/v1alpha1",
        "kind": "DiffusionCascade",
        "metadata": {"name": "chaos"},
        "spec": {
            "sloSeconds": slo_seconds,
            "gpuBudget": 2,
            "objective": "MaxThreshold",
            "variants": [
                {
                    "name": "light",
                    "model": str(light),
                    "steps": 1,
                    "resolution": 64,
                    "minReplicas": 1,
                    "maxReplicas": 1,
                    "maxBatchSize": 4,
                    "profile": {"batchLatencyMs": {"1": 40, "2": 60, "4": 100}},
                    "gate": {
                        "discriminator": {"uri": str(light / "gate.pt")},
                        "deferCurve": {"path": str(light / "defer_curve.json")},
                    },
                },
                {
                    "name": "heavy",
                    "model": str(heavy),
                    "steps": 8,
                    "guidanceScale": 7.5,
                    "resolution": 64,
                    "minReplicas": 1,
                    "maxReplicas": 1,
                    "maxBatchSize": 2,
                    "profile": {"batchLatencyMs": {"1": 250, "2": 400}},
                },
            ],
            "control": {"intervalSeconds": 2, "scaleDownStabilizationSeconds": 60},
        },
    }


# --- the cascade -------------------------------------------------------------------------------


@dataclass
class WorkerInfo:
    variant: str
    pid: int
    url: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


class Up:
    """`diffcascade up` as a subprocess; its workers are read from the state document."""

    def __init__(self, cascade_file: Path, run_dir: Path) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.run_dir = run_dir
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from diffcascade_operator.cli import main; main()",
                "up",
                str(cascade_file),
                "--port",
                "0",
                "--no-live",
                "--run-dir",
                str(run_dir),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.seen: set[int] = set()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def port(self) -> int:
        """The router's port."""
        return int(self.url.rsplit(":", 1)[1])

    def wait_ready(self, timeout_s: float = 240.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.remember_children()
            match = READY.search(self.output)
            if match:
                self.url = match.group(1)
                return self.url
            if self.proc.poll() is not None:
                raise RuntimeError(f"`up` exited early ({self.proc.returncode}):\n{self.output}")
            time.sleep(0.3)
        raise RuntimeError(f"`up` not ready in {timeout_s} s:\n{self.output}")

    def state(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.run_dir / "state.json").read_text())
        return doc

    def workers(self, variant: str, *, ready_only: bool = True) -> list[WorkerInfo]:
        found = []
        for worker in self.state()["replicas"][variant]["workers"]:
            if not ready_only or worker["state"] == "ready":
                found.append(WorkerInfo(variant, worker["pid"], worker["url"]))
        return found

    def worker(self, variant: str) -> WorkerInfo:
        workers = self.workers(variant)
        if not workers:
            raise RuntimeError(f"no ready {variant} worker")
        return workers[0]

    def wait_workers(self, timeout_s: float = 240.0) -> None:
        """Until the state document shows a ready worker of every stage."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.remember_children()
            with contextlib.suppress(OSError, ValueError, KeyError):
                if self.workers("light") and self.workers("heavy"):
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"`up` exited early ({self.proc.returncode}):\n{self.output}")
            time.sleep(0.5)
        raise RuntimeError(f"workers not ready in {timeout_s} s:\n{self.output}")

    def remember_children(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            self.seen.update(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))

    def stop(self, timeout_s: float = 90.0) -> int:
        self.remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)

    def survivors(self, timeout_s: float = 15.0) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            alive = []
            for pid in self.seen:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc = psutil.Process(pid)
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{pid}: {' '.join(proc.cmdline())[:120]}")
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.3)


@contextlib.contextmanager
def running_cascade(models: dict[str, Path], work_dir: Path, **doc: Any) -> Iterator[Up]:
    cascade_file = work_dir / "chaos.yaml"
    cascade_file.write_text(yaml.safe_dump(cascade_doc(models, **doc)))
    up = Up(cascade_file, work_dir / "run")
    try:
        up.wait_ready()
        up.wait_workers()
        yield up
    finally:
        up.stop()


def worker_token(pid: int) -> str:
    """The config token `up` gave a worker (in its environment, never on its command line)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for entry in environ:
        if entry.startswith(b"DIFFCASCADE_TOKEN="):
            return entry.split(b"=", 1)[1].decode()
    raise RuntimeError(f"worker {pid} has no token in its environment")


def rss_mb(pid: int) -> float:
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.NoSuchProcess:
        return 0.0


# --- load --------------------------------------------------------------------------------------


@dataclass
class Result:
    sent_at: float  # seconds since the load began
    status: int  # -1: no answer (transport error)
    code: str | None  # error envelope code, or the transport error's name
    latency_s: float
    served_by: str | None = None
    degraded: bool = False

    @property
    def documented(self) -> bool:
        return self.status == 200 or self.code in DOCUMENTED.get(self.status, set())


@dataclass
class Load:
    """Open-loop Poisson arrivals at `qps` to `url`, at most `max_in_flight` open at once."""

    url: str
    qps: float
    slo_seconds: float
    max_in_flight: int = 32
    seed: int = 7
    results: list[Result] = field(default_factory=list)
    skipped: int = 0  # arrivals not sent because max_in_flight were open
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, duration_s: float) -> None:
        rng = random.Random(self.seed)
        started = time.monotonic()
        open_requests: set[asyncio.Task[None]] = set()
        timeout = httpx.Timeout(self.slo_seconds + 30.0, connect=5.0)
        limits = httpx.Limits(max_connections=self.max_in_flight)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            index = 0
            while not self._stop.is_set() and time.monotonic() - started < duration_s:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=rng.expovariate(self.qps))
                if len(open_requests) >= self.max_in_flight:
                    self.skipped += 1
                    continue
                index += 1
                task = asyncio.create_task(self._one(client, index, started))
                open_requests.add(task)
                task.add_done_callback(open_requests.discard)
            await asyncio.gather(*open_requests)

    def stop(self) -> None:
        self._stop.set()

    async def _one(self, client: httpx.AsyncClient, index: int, started: float) -> None:
        sent = time.monotonic()
        body = {"prompt": f"a lighthouse at dusk, variation {index}", "seed": index}
        try:
            response = await client.post(self.url + GEN, json=body)
        except httpx.HTTPError as error:
            self.results.append(
                Result(sent - started, -1, type(error).__name__, time.monotonic() - sent)
            )
            return
        latency = time.monotonic() - sent
        code = None
        served_by, degraded = None, False
        try:
            doc = response.json()
        except ValueError:
            code = "not-json"
        else:
            if response.status_code == 200:
                image = doc["data"][0]
                served_by, degraded = image.get("served_by"), bool(image.get("degraded"))
            else:
                code = (doc.get("error") or {}).get("code")
        self.results.append(
            Result(sent - started, response.status_code, code, latency, served_by, degraded)
        )

    def between(self, start: float, end: float) -> list[Result]:
        return [r for r in self.results if start <= r.sent_at < end]

    def now(self, started: float) -> float:
        return time.monotonic() - started


def summary(results: list[Result]) -> dict[str, Any]:
    latencies = sorted(r.latency_s for r in results if r.status == 200)

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3)

    kinds = Counter(
        "ok" if r.status == 200 else f"{r.status}:{r.code}" for r in results
    )  # errors by kind
    return {
        "requests": len(results),
        "by_kind": dict(sorted(kinds.items())),
        "served_by": dict(Counter(r.served_by for r in results if r.status == 200)),
        "degraded": sum(r.degraded for r in results),
        "undocumented": sum(not r.documented for r in results),
        "p50_s": pct(0.5),
        "p99_s": pct(0.99),
        "max_s": round(max((r.latency_s for r in results), default=0.0), 3),
    }


# --- faults ------------------------------------------------------------------------------------


@contextlib.contextmanager
def idle_flood(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections that never send a byte; closed on exit."""
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            with contextlib.suppress(OSError):
                opened.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        yield opened
    finally:
        for sock in opened:
            sock.close()


def closed_count(sockets: list[socket.socket]) -> int:
    """How many of `sockets` the server has closed."""
    closed = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            if sock.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


async def probe(url: str, path: str, count: int) -> list[int]:
    """`count` GETs, each on a new connection (as a kubelet probes)."""
    statuses = []
    for _ in range(count):
        try:
            async with httpx.AsyncClient(timeout=3.0) as client:
                statuses.append((await client.get(url + path)).status_code)
        except httpx.HTTPError:
            statuses.append(-1)
    return statuses


async def bad_bodies(url: str) -> list[tuple[int, str | None]]:
    """Oversized and malformed generation bodies; (status, error code) of each."""
    cases: list[tuple[bytes, str]] = [
        (b'{"prompt": "' + b"x" * (4 * 2**20) + b'"}', "application/json"),  # 4 MB
        (b"{not json", "application/json"),
        (b'{"prompt": 12, "n": "many"}', "application/json"),
        (b'{"n": 1}', "application/json"),
        (b"\xff\xfe\x00garbage", "application/octet-stream"),
    ]
    answers: list[tuple[int, str | None]] = []
    async with httpx.AsyncClient(timeout=30.0) as client:
        for body, content_type in cases:
            try:
                response = await client.post(
                    url + GEN, content=body, headers={"content-type": content_type}
                )
            except httpx.HTTPError as error:
                answers.append((-1, type(error).__name__))
                continue
            try:
                code = response.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "not-json"
            answers.append((response.status_code, code))
    return answers


async def bad_configs(worker_url: str, token: str) -> list[int]:
    """Config pushes that must be refused; their status codes."""
    auth = {"Authorization": f"Bearer {token}"}
    pushes: list[tuple[dict[str, Any], dict[str, str]]] = [
        ({"slo_seconds": 1e-300}, auth),
        ({"next_stage_url": "http://capture.invalid:9/x#"}, auth),
        ({"next_stage_url": worker_url}, auth),  # itself
        ({"max_batch_wait_ms": 9000, "slo_seconds": 3}, auth),
        ({"batch_size": 0}, auth),
        ({"threshold": 1.0}, {}),  # no token
        ({"threshold": 1.0}, {"Authorization": "Bearer wrong"}),
    ]
    statuses = []
    async with httpx.AsyncClient(timeout=10.0) as client:
        for body, headers in pushes:
            response = await client.put(
                worker_url + "/v1/cascade/config", json=body, headers=headers
            )
            statuses.append(response.status_code)
    return statuses


async def wait_for(predicate: Any, *, timeout_s: float, step_s: float = 0.5) -> float | None:
    """Seconds until `predicate()` (sync or async) is true, or None at the timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - started
        await asyncio.sleep(step_s)
    return None


async def heavy_serves(entry_url: str, *, seed: int) -> bool:
    """One request through the entry is answered by the heavy stage (a deferral worked)."""
    try:
        async with httpx.AsyncClient(timeout=15.0) as client:
            response = await client.post(entry_url + GEN, json={"prompt": "hard", "seed": seed})
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.json()["data"][0]["served_by"] == "heavy"


# --- connection faults -------------------------------------------------------------------------


@contextlib.contextmanager
def pipelining_nonreaders(port: int, count: int, requests: int) -> Iterator[list[socket.socket]]:
    """`count` clients that each pipeline `requests` GETs of the OpenAPI document (15 KB) with
    a 4 KB receive window and never read: no GPU work, yet answers pile up on the server."""
    burst = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * requests
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            with contextlib.suppress(OSError):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(2)
                sock.connect(("127.0.0.1", port))
                sock.sendall(burst)
                opened.append(sock)
        yield opened
    finally:
        for sock in opened:
            sock.close()


async def hang_ups(url: str, count: int, *, after_s: float, body: dict[str, Any]) -> int:
    """`count` generation requests whose clients close their sockets `after_s` later (or
    right after the first server-sent event, with `after_s` 0 and a streamed body); returns
    how many got an answer byte first."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    payload = json.dumps(body).encode()

    async def one() -> bool:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {GEN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        answered = False
        try:
            if after_s:
                answered = bool(await asyncio.wait_for(reader.read(1), after_s))
            else:
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                answered = bool(await asyncio.wait_for(reader.readuntil(b"\n\n"), 30))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()
        return answered

    return sum(await asyncio.gather(*(one() for _ in range(count))))


def outcomes(url: str) -> Counter[str]:
    """A worker's completions by outcome (served, deferred, abandoned, ...), from /metrics."""
    counts: Counter[str] = Counter()
    text = httpx.get(url + "/metrics", timeout=10.0).text
    for line in text.splitlines():
        if line.startswith("diffcascade_completed_requests_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] += int(float(line.rsplit(" ", 1)[1]))
    return counts


async def big_body(url: str, megabytes: int) -> tuple[int, str | None, float]:
    """(status, error code, seconds) of one generation request with a body of `megabytes`."""
    chunk = b"x" * 2**20

    async def body() -> Any:
        yield b'{"prompt": "'
        for _ in range(megabytes):
            yield chunk
        yield b'"}'

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=60.0) as client:
        try:
            response = await client.post(
                url + GEN,
                content=body(),
                headers={
                    "content-type": "application/json",
                    "content-length": str(megabytes * 2**20 + 14),
                },
            )
        except httpx.HTTPError as error:
            return -1, type(error).__name__, time.monotonic() - started
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "not-json"
    return response.status_code, code, time.monotonic() - started
