"""One cascade on one machine: router, workers, metrics and the same control loop as the operator.

Every `control.intervalSeconds`: read demand and queues (the private Prometheus when the binary
is installed, else the workers' /metrics directly), build a Snapshot, `decide()`, apply the Plan
with the LocalActuator, write the state document. Between ticks a faster loop admits workers
that turned ready and notices ones that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from diffcascade_worker.serving.api_keys import ApiKeys

from diffcascade_operator.control import FIRST_READING_POLL_S, step_due
from diffcascade_operator.kube.status import profile_drift_condition, profiles_doc
from diffcascade_operator.live_profiles import LiveProfileResult, LiveProfileSettings
from diffcascade_operator.local.actuator import LocalActuator
from diffcascade_operator.local.prometheus import LocalPrometheus, prometheus_binary
from diffcascade_operator.local.router import Router
from diffcascade_operator.local.state import STATE_FILE, plan_to_dict, write_state
from diffcascade_operator.local.supervisor import Supervisor, WorkerState
from diffcascade_operator.measured_slo import MeasuredSlo, SloSettings, read_slo, slo_summary
from diffcascade_operator.metrics_source import (
    FallbackSource,
    MetricsReading,
    MetricsSource,
    PrometheusSource,
    ScrapeSource,
    live_source_for,
)
from diffcascade_operator.plan import Plan
from diffcascade_operator.profiles import CascadeProfiles
from diffcascade_operator.queueing import Dispatch
from diffcascade_operator.router_config import router_config
from diffcascade_operator.snapshot import DemandSample
from diffcascade_operator.snapshot_builder import build_snapshot, read_live_profiles, read_metrics
from diffcascade_operator.spec import CascadeSpec

logger = logging.getLogger(__name__)

_DEMAND_WINDOW_S = 120.0
_HISTORY = 200
_RECONCILE_S = 0.5
_TIMELINE = 7200  # ticks kept for plan.png (four hours at a 2-s interval)
#: A threshold move smaller than this, with nothing else changed, is pushed to the workers but
#: not logged as a plan change: near a flat stretch of the quality curve the optimum jitters
#: between neighbouring grid points as the live-profile window slides, even with no traffic.
THRESHOLD_LOG_STEP = 0.01


#: Workers of one variant that may die before any of them turns ready, before `up` gives up.
MAX_START_FAILURES = 3
#: What the router gives a stage beyond the SLO before it answers 504.
STAGE_GRACE_S = 2.0


class StartupFailed(RuntimeError):
    """Workers keep dying before they turn ready (bad model, bad flag); the log tail says why."""


class LocalCascade:
    """Start with `await start()`, stop with `await stop()` (idempotent; also `shutdown_now()`)."""

    def __init__(
        self,
        *,
        name: str,
        spec: CascadeSpec,
        profiles: CascadeProfiles,
        run_dir: Path,
        base_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        use_prometheus: bool | None = None,
        drain_timeout_s: float = 10.0,
        on_update: Callable[[dict[str, Any], bool], None] | None = None,
        api_keys: ApiKeys | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.profiles = profiles
        self.run_dir = run_dir
        self.state_path = run_dir / STATE_FILE
        self.host = host
        self.port = port
        self.on_update = on_update
        self.variants = [v.name for v in spec.variants]
        token = secrets.token_urlsafe(24)
        self.router = Router(
            variants=self.variants,
            plan=self.state,
            cascade=name,
            api_keys=api_keys,
            # A worker answers within the SLO (it drops or degrades what cannot make it):
            # one that takes longer is hung, and its client gets a 504 instead of a long wait.
            forward_timeout_s=spec.slo_seconds + STAGE_GRACE_S,
        )
        self.supervisor = Supervisor(
            cascade=name,
            log_dir=run_dir / "logs",
            token=token,
            host=host,
            drain_timeout_s=drain_timeout_s,
        )
        self.actuator = LocalActuator(
            spec=spec,
            supervisor=self.supervisor,
            router=self.router,
            token=token,
            base_dir=base_dir,
            max_start_failures=MAX_START_FAILURES,
        )
        binary = prometheus_binary() if use_prometheus is not False else None
        if use_prometheus and binary is None:
            raise RuntimeError("--prometheus asked for, but no `prometheus` binary is on PATH")
        self.prometheus = (
            LocalPrometheus(binary=binary, log_path=run_dir / "logs" / "prometheus.log")
            if binary
            else None
        )
        self.source: MetricsSource | None = None
        self._scrape: ScrapeSource | None = None
        self.plan: Plan | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=_HISTORY)
        #: Every tick (not only plan changes): planned and measured demand, threshold, desired,
        #: ready and starting replicas per stage; what plan.png draws.
        self.timeline: deque[dict[str, Any]] = deque(maxlen=_TIMELINE)
        self._logged: Plan | None = None  # the last plan logged as a change
        self.ticks = 0
        self.last_reading: MetricsReading | None = None
        #: The last reading's demand sample (`snapshot_builder.demand_sample`): every arrival
        #: of the cascade, as the operator's `status.demand.measuredQps`.
        self.measured_qps: float | None = None
        self.metrics_error: str | None = None
        self.live_settings = LiveProfileSettings()
        self.live: LiveProfileResult | None = None
        self.live_note: str | None = None
        self.slo_settings = SloSettings()
        self.measured_slo: MeasuredSlo | None = None
        self.slo_note: str | None = None
        self.started_at = time.time()
        self._demand: deque[DemandSample] = deque()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self.ready_event = asyncio.Event()

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> str:
        """Router up, metrics source chosen, first plan applied; returns the entry URL."""
        url = await self.router.start(host=self.host, port=self.port)
        # A first direct reading measures over `first_gap_s`; too short a gap turns one or two
        # arrivals into a demand spike (e.g. 4 qps from 2 requests in 0.5 s).
        gap = min(2.0, max(0.5, self.spec.control.interval_seconds))
        self._scrape = ScrapeSource(
            self._endpoints, timeout_s=1.0, first_gap_s=gap, routers=lambda: [self.router.url]
        )
        if self.prometheus is not None:
            try:
                prom_url = self.prometheus.launch(
                    host=self.host, router=self.router.url.removeprefix("http://")
                )
                await self.prometheus.wait_ready()
            except (RuntimeError, OSError) as exc:
                logger.warning("%s; scraping the workers directly", exc)
                self.prometheus = None
            else:
                window = max(5.0, 3.0 * self.spec.control.interval_seconds)
                self.source = FallbackSource(
                    PrometheusSource(
                        prom_url,
                        window_s=window,
                        timeout_s=1.0,
                        demand_window_s=self.spec.control.interval_seconds,
                    ),
                    self._scrape,
                )
        if self.source is None:
            self.source = self._scrape
        await self._tick()
        self._tasks = [
            asyncio.create_task(self._control_loop(), name="control"),
            asyncio.create_task(self._reconcile_loop(), name="reconcile"),
        ]
        return url

    async def wait_ready(self, timeout_s: float) -> str:
        """The entry URL once a first-stage replica serves; TimeoutError otherwise."""
        async with asyncio.timeout(timeout_s):
            while not self.router.ready():
                self._raise_if_failed()
                for variant, log in self.actuator.start_failures():
                    if log is not None:
                        tail = await asyncio.to_thread(_tail, log)
                        raise StartupFailed(
                            f"{variant} workers exited {MAX_START_FAILURES} times before "
                            f"turning ready; last log {log}:\n{tail}"
                        )
                await asyncio.sleep(0.2)
        return self.router.url

    def _raise_if_failed(self) -> None:
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError("the control loop failed") from task.exception()

    async def stop(self) -> None:
        """Stop the loops, drain and stop every worker, Prometheus and the router."""
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for pool in self.router.pools.values():
            for url in pool.urls():
                pool.remove(url)
        await asyncio.to_thread(self.supervisor.shutdown)
        await self._close_rest()

    async def _close_rest(self) -> None:
        if self.prometheus is not None:
            await asyncio.to_thread(self.prometheus.stop)
        if self._scrape is not None:
            self._scrape.close()
        await self.actuator.aclose()
        await self.router.stop()
        with contextlib.suppress(OSError):
            write_state(self.state_path, self.state(running=False))

    def shutdown_now(self) -> None:
        """Synchronous last resort (atexit, second Ctrl-C): kill children, remove temp dirs."""
        self.supervisor.shutdown(grace_s=1.0)
        if self.prometheus is not None:
            self.prometheus.stop()

    # --- loops ---------------------------------------------------------------------------------

    def _endpoints(self) -> Mapping[str, Sequence[str]]:
        return {
            v: [w.url for w in self.supervisor.of(v, WorkerState.READY, WorkerState.DRAINING)]
            for v in self.variants
        }

    async def _control_loop(self) -> None:
        interval = self.spec.control.interval_seconds
        last = time.monotonic()
        while True:
            await asyncio.sleep(min(interval, FIRST_READING_POLL_S))
            due = step_due(self.plan, since_last_s=time.monotonic() - last, interval_s=interval)
            if due is False:
                continue
            if due:
                last = time.monotonic()  # an early step (None) keeps the regular cadence
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad tick must not end the loop; the next one retries
                logger.exception("control tick failed")

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(_RECONCILE_S)
            try:
                await self.actuator.reconcile()
                if self.prometheus is not None:
                    self.prometheus.set_targets(
                        {
                            v: [f"{w.host}:{w.port}" for w in ws]
                            for v, ws in (
                                (v, self.supervisor.of(v, WorkerState.READY, WorkerState.DRAINING))
                                for v in self.variants
                            )
                        }
                    )
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("reconcile failed")
            if self.router.ready():
                self.ready_event.set()

    async def _read_metrics(self) -> MetricsReading | None:
        assert self.source is not None
        reading, self.metrics_error = await asyncio.to_thread(
            read_metrics, self.source, cascade=self.name, variants=self.variants
        )
        return reading

    async def _tick(self) -> None:
        from diffcascade_operator.control import decide

        reading = await self._read_metrics() if self.supervisor.workers else None
        now = time.monotonic()
        if reading is not None:
            logger.debug(
                "reading %s: demand %.3f qps %s", reading.source, reading.demand_qps, reading.stages
            )
            self.last_reading = reading
        while self._demand and now - self._demand[0].at > _DEMAND_WINDOW_S:
            self._demand.popleft()
        live, self.live_note = await asyncio.to_thread(
            read_live_profiles,
            live_source_for(self.source, reading),
            profiles=self.profiles,
            cascade=self.name,
            variants=self.variants,
            plan=self.plan,
            settings=self.live_settings,
        )
        self.live = live
        self.measured_slo, self.slo_note = await asyncio.to_thread(
            read_slo,
            live_source_for(self.source, reading),
            cascade=self.name,
            variants=self.variants,
            slo_s=self.spec.slo_seconds,
            settings=self.slo_settings,
        )
        snapshot = build_snapshot(
            spec=self.spec,
            profiles=live.profiles,
            now=now,
            history=self._demand,
            reading=reading,
            ready_replicas={
                v: len(self.supervisor.of(v, WorkerState.READY)) for v in self.variants
            },
            dispatch=Dispatch.LEAST_LOADED,  # the entry URL's router picks the least loaded
            entry=self.plan.entry() if self.plan is not None else None,
        )
        if reading is not None:
            self.measured_qps = self._demand[-1].qps
        previous = self.plan
        plan = decide(snapshot, previous)
        changed = notable_change(plan, self._logged)
        self.plan = plan
        self.ticks += 1
        await self.actuator.apply(plan)
        self._route_by(plan)
        self.timeline.append(self._moment(plan, reading))
        if changed:
            self._logged = plan
            self.history.append(
                {
                    "at": time.time(),
                    "tick": self.ticks,
                    "demand_qps": round(plan.demand_qps, 3),
                    "measured_qps": self._measured(reading),
                    "metrics_source": reading.source if reading else None,
                    "threshold": plan.threshold,
                    "defer_fraction": plan.defer_fraction,
                    "replicas": plan.replicas(),
                    "batch_sizes": {v.name: v.batch_size for v in plan.variants},
                    "solver": str(plan.solver.status),
                    "reason": plan.reason,
                }
            )
        state = self.state()
        await asyncio.to_thread(write_state, self.state_path, state)
        if self.on_update is not None:
            self.on_update(state, changed)

    def _route_by(self, plan: Plan) -> None:
        """The entry URL's pre-generation step follows the plan (entry, heavy stage, r)."""
        self.router.route_by(router_config(plan, self.spec, stage_url=self.router.stage_url))

    def _measured(self, reading: MetricsReading | None) -> float | None:
        return round(self.measured_qps, 3) if reading and self.measured_qps is not None else None

    def _moment(self, plan: Plan, reading: MetricsReading | None) -> dict[str, Any]:
        desired = plan.replicas()
        return {
            "at": time.time(),
            "demand_qps": round(plan.demand_qps, 3),
            "measured_qps": self._measured(reading),
            "threshold": plan.threshold,
            "desired": desired,
            "ready": {v: len(self.supervisor.of(v, WorkerState.READY)) for v in self.variants},
            "starting": {
                v: len(self.supervisor.of(v, WorkerState.STARTING)) for v in self.variants
            },
        }

    # --- state ---------------------------------------------------------------------------------

    def state(self, *, running: bool = True) -> dict[str, Any]:
        reading = self.last_reading
        replicas: dict[str, Any] = {}
        for variant in self.variants:
            pool = self.router.pools[variant]
            workers = self.supervisor.of(
                variant,
                WorkerState.STARTING,
                WorkerState.READY,
                WorkerState.UNREADY,
                WorkerState.DRAINING,
            )
            stage = reading.stages.get(variant) if reading else None
            desired = self.plan.replicas().get(variant) if self.plan else None
            replicas[variant] = {
                "desired": desired,
                "ready": sum(w.state is WorkerState.READY for w in workers),
                "starting": sum(w.state is WorkerState.STARTING for w in workers),
                "draining": sum(w.state is WorkerState.DRAINING for w in workers),
                "queue_depth": stage.queue_depth if stage else None,
                "arrival_qps": round(stage.arrival_qps, 3) if stage else None,
                "workers": [
                    {
                        "name": w.name,
                        "url": w.url,
                        "pid": w.process.pid,
                        "state": str(w.state),
                        "outstanding": pool.outstanding(w.url),
                        "log": str(w.log_path),
                    }
                    for w in workers
                ],
            }
        return {
            "cascade": self.name,
            "slo_seconds": self.spec.slo_seconds,  # `diffcascade load` takes its SLO from here
            "running": running and not self._stopped,
            "pid": os.getpid(),
            "entry_url": self.router.url,
            "started_at": self.started_at,
            "updated_at": time.time(),
            "ticks": self.ticks,
            "metrics": {
                "source": reading.source if reading else None,
                "demand_qps": self._measured(reading),
                "error": self.metrics_error,
                "prometheus": self.prometheus.url if self.prometheus else None,
            },
            "plan": plan_to_dict(self.plan) if self.plan else None,
            "router": self.router.pre_route.state() if self.router.pre_route else None,
            "profiles": self._profiles_state(),
            "slo": slo_summary(
                self.measured_slo,
                plan=self.plan,
                slo_s=self.spec.slo_seconds,
                settings=self.slo_settings,
                note=self.slo_note,
            ),
            "replicas": replicas,
            "history": list(self.history),
        }

    def _profiles_state(self) -> dict[str, Any] | None:
        """The document a cluster writes to status.profiles, plus the ProfileDrift condition."""
        if self.live is None:
            return None
        cond = profile_drift_condition(self.live, note=self.live_note)
        return {
            **profiles_doc(self.live),
            "condition": {"status": cond.status, "reason": cond.reason, "message": cond.message},
        }


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def notable_change(plan: Plan, logged: Plan | None) -> bool:
    """Whether `plan` differs from the last logged one in what a reader of the log cares
    about: replicas, batch sizes, routing, solver outcome, or the threshold by more than
    `THRESHOLD_LOG_STEP`."""
    if logged is None:
        return True
    shape = [(v.name, v.replicas, v.batch_size, v.next_stage) for v in plan.variants]
    before = [(v.name, v.replicas, v.batch_size, v.next_stage) for v in logged.variants]
    return (
        shape != before
        or plan.solver.status is not logged.solver.status
        or abs(plan.threshold - logged.threshold) > THRESHOLD_LOG_STEP + 1e-9
    )
