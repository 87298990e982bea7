"""Applies a Plan on one machine: worker processes per variant, configs pushed over HTTP.

The local counterpart of the Kubernetes actuator: scaling up starts processes that join the
router once `/readyz` is 200 (with the plan's config pushed first); scaling down removes the
idlest replica from the router and drains it with SIGTERM. Like a kubelet's readiness probe,
`/readyz` keeps being asked of every ready worker: one that stops answering (stopped, hung,
or saying it cannot serve) leaves the router after `UNREADY_AFTER_FAILURES` probes and comes
back when it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from diffcascade_worker.protocol import PATH_CONFIG, PATH_READYZ

from diffcascade_operator.local.gpus import GpuAssigner, visible_gpus
from diffcascade_operator.local.router import Router
from diffcascade_operator.local.supervisor import Supervisor, Worker, WorkerState
from diffcascade_operator.plan import Plan
from diffcascade_operator.spec import CascadeSpec, VariantSpec
from diffcascade_operator.worker_config import WorkerFiles, config_body, serve_args

logger = logging.getLogger(__name__)

#: Seconds a worker has to answer /readyz.
PROBE_TIMEOUT_S = 1.0
#: Consecutive failed /readyz probes that take a ready worker out of the router.
UNREADY_AFTER_FAILURES = 2


def resolve_local_path(value: str, *, base_dir: Path) -> str:
    """A path-looking value (relative or absolute) resolved against base_dir; else unchanged."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = base_dir / path
    if candidate.exists() or value.startswith((".", "~")) or not _looks_like_hub_id(value):
        return str(candidate.resolve())
    return value


def _looks_like_hub_id(value: str) -> bool:
    return value.count("/") == 1 and not value.startswith(("/", "."))


@dataclass(frozen=True)
class MissingModel:
    variant: str
    path: str


def missing_models(spec: CascadeSpec, *, base_dir: Path) -> list[MissingModel]:
    """Variants whose model (or replacement UNet, or gate) is a local path that does not
    exist."""
    missing = []
    for variant in spec.variants:
        model = resolve_local_path(variant.model, base_dir=base_dir)
        if Path(model).is_absolute() and not Path(model).exists():  # hub ids stay relative
            missing.append(MissingModel(variant.name, model))
        if variant.unet is not None:
            unet = resolve_local_path(variant.unet, base_dir=base_dir)
            if not Path(unet).exists():
                missing.append(MissingModel(variant.name, unet))
        gate = variant.gate.discriminator if variant.gate else None
        if gate is not None:
            gate_path = resolve_local_path(gate.uri, base_dir=base_dir)
            if not Path(gate_path).exists():
                missing.append(MissingModel(variant.name, gate_path))
    return missing


class LocalActuator:
    def __init__(
        self,
        *,
        spec: CascadeSpec,
        supervisor: Supervisor,
        router: Router,
        token: str,
        base_dir: Path,
        max_start_failures: int = 3,
        gpus: tuple[str, ...] | None = None,
    ) -> None:
        self.spec = spec
        # Each worker its own GPUs, as the device plugin gives each pod its own.
        self.gpus = GpuAssigner(visible_gpus() if gpus is None else gpus)
        self.max_start_failures = max_start_failures
        # Per variant: workers that died before turning ready since the last one that did.
        self._start_failures: dict[str, list[Path]] = {}
        self.supervisor = supervisor
        self.router = router
        self.base_dir = base_dir
        self.plan: Plan | None = None
        self._headers = {"Authorization": f"Bearer {token}"}
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(5.0), trust_env=False)
        self._lock = asyncio.Lock()

    async def aclose(self) -> None:
        await self._client.aclose()

    def _variant(self, name: str) -> VariantSpec:
        return next(v for v in self.spec.variants if v.name == name)

    def desired_config(self, name: str) -> dict[str, Any]:
        """The config document every ready worker of `name` should hold (the body the
        Kubernetes actuator pushes too: `worker_config.config_body`)."""
        return config_body(self.plan, name, spec=self.spec, stage_url=self.router.stage_url)

    def _serve_args(self, variant: VariantSpec) -> list[str]:
        gate = variant.gate.discriminator if variant.gate else None
        files = WorkerFiles(
            model=resolve_local_path(variant.model, base_dir=self.base_dir),
            gate=resolve_local_path(gate.uri, base_dir=self.base_dir) if gate else None,
            unet=(
                resolve_local_path(variant.unet, base_dir=self.base_dir)
                if variant.unet is not None
                else None
            ),
        )
        args = serve_args(
            self.spec,
            variant.name,
            cascade=self.supervisor.cascade,
            files=files,
            stage_url=self.router.stage_url,
            extra={"threads": "1", "log-level": "info"},
        )
        # The run folder's worker logs: load, ready and config lines, one line per request.
        return [*args, "--access-log"]

    async def apply(self, plan: Plan) -> None:
        """Scale every variant to the plan and push its config to every ready worker."""
        async with self._lock:
            self.plan = plan
            for allocation in plan.variants:
                self._scale(allocation.name, allocation.replicas)
            await self._push_all()

    def _scale(self, name: str, replicas: int) -> None:
        live = self.supervisor.of(name)
        self.gpus.keep_only(w for w in self.supervisor.workers if w.state is not WorkerState.EXITED)
        variant = self._variant(name)
        for _ in range(replicas - len(live)):
            devices = self.gpus.pick(variant.gpus_per_replica)
            if devices is None:
                logger.warning(
                    "no free GPU for another %s worker (%d GPUs here, all in use): the plan "
                    "wants more than this machine has",
                    name,
                    len(self.gpus.gpus),
                )
                break
            worker = self.supervisor.launch(
                name, self._serve_args(variant), env=self.gpus.env(devices)
            )
            self.gpus.hold(worker, devices)
            logger.info("started %s on %s (GPUs: %s)", worker.name, worker.url, devices or "-")
        surplus = len(live) - replicas
        if surplus > 0:
            pool = self.router.pools[name]
            # Not-ready ones first (newest first), then the ready ones with least in flight.
            order = sorted(
                live,
                key=lambda w: (
                    w.state is WorkerState.READY,
                    pool.outstanding(w.url),
                    -w.started_at,
                ),
            )
            for worker in order[:surplus]:
                pool.remove(worker.url)
                self.supervisor.drain(worker)
                logger.info("draining %s", worker.name)

    async def reconcile(self) -> None:
        """Between ticks: notice deaths, admit workers that turned ready."""
        for worker in self.supervisor.poll():
            self.router.pools[worker.variant].remove(worker.url)
            logger.warning(
                "%s exited unexpectedly (exit code %s); see %s",
                worker.name,
                worker.process.returncode,
                worker.log_path,
            )
            if worker.state is WorkerState.EXITED and worker.pushed is None:
                self._start_failures.setdefault(worker.variant, []).append(worker.log_path)
        probed = [
            w
            for w in self.supervisor.workers
            if w.state in (WorkerState.STARTING, WorkerState.READY, WorkerState.UNREADY)
        ]
        if not probed:
            return
        ready = await asyncio.gather(*(self._is_ready(w) for w in probed))
        # Probes act at once, outside the lock: a tick may hold it for a whole push timeout
        # on the very worker that stopped answering, and the router must not keep sending it
        # work meanwhile. (No await here, so nothing interleaves.)
        admit: list[Worker] = []
        for worker, ok in zip(probed, ready, strict=True):
            if not ok:
                if worker.state is not WorkerState.STARTING:
                    self._count_failed_probe(worker)
            elif worker.state is WorkerState.READY:
                worker.failed_probes = 0
            else:
                admit.append(worker)
        if not admit:
            return
        async with self._lock:  # admission pushes the config in force: not beside a tick's
            for worker in admit:
                if worker.state is WorkerState.STARTING:
                    if await self._push(worker):
                        worker.state = WorkerState.READY
                        self._start_failures.pop(worker.variant, None)
                        self.router.pools[worker.variant].add(worker.url)
                        logger.info("%s ready", worker.name)
                elif worker.state is WorkerState.UNREADY:
                    await self._readmit(worker)

    def _count_failed_probe(self, worker: Worker) -> None:
        """A ready worker that fails `UNREADY_AFTER_FAILURES` probes in a row leaves the router."""
        worker.failed_probes += 1
        if worker.state is WorkerState.READY and worker.failed_probes >= UNREADY_AFTER_FAILURES:
            worker.state = WorkerState.UNREADY
            self.router.pools[worker.variant].remove(worker.url)
            logger.warning(
                "%s stopped answering /readyz (%d probes): out of the router until it does",
                worker.name,
                worker.failed_probes,
            )

    async def _readmit(self, worker: Worker) -> None:
        """A worker that answers again comes back, with the config in force, once it holds it."""
        worker.failed_probes = 0
        if worker.state is WorkerState.UNREADY and await self._push(worker):
            worker.state = WorkerState.READY
            self.router.pools[worker.variant].add(worker.url)
            logger.warning("%s answers again: back in the router", worker.name)

    def start_failures(self) -> list[tuple[str, Path | None]]:
        """(variant, last log) for variants whose workers keep dying before turning ready."""
        return [
            (variant, logs[-1] if len(logs) >= self.max_start_failures else None)
            for variant, logs in self._start_failures.items()
        ]

    async def _is_ready(self, worker: Worker) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            response = await self._client.get(worker.url + PATH_READYZ, timeout=PROBE_TIMEOUT_S)
            return response.status_code == 200
        return False

    async def _push_all(self) -> None:
        ready = [w for w in self.supervisor.workers if w.state is WorkerState.READY]
        await asyncio.gather(*(self._push(w) for w in ready))

    async def _push(self, worker: Worker) -> bool:
        desired = self.desired_config(worker.variant)
        if worker.pushed == desired:
            return True
        try:
            response = await self._client.put(
                worker.url + PATH_CONFIG, json=desired, headers=self._headers
            )
        except httpx.HTTPError as exc:
            logger.warning("config push to %s failed: %s", worker.name, exc)
            return False
        if response.status_code >= 300:
            logger.warning(
                "config push to %s refused (%s): %s",
                worker.name,
                response.status_code,
                response.text[:200],
            )
            return False
        worker.pushed = desired
        return True
