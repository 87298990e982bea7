"""Discrete-event simulation of a cascade in virtual time (a heap of events, no sleeping).

Each replica is a worker with its own FIFO queue, fed by a stage-level dispatcher (least
loaded by default, like a queue-aware load balancer; round-robin as an option, closer to a
Kubernetes Service). Workers follow the real worker's rules, from the worker's own code:

- batching: when idle, take up to `b` queued queries at once; with `maxBatchWaitMs` set, an
  idle worker holding fewer than `b` waits until the oldest has waited that long (the
  batcher's rule), then runs what it has;
- drop at dequeue: `deadline.should_drop` with the query's remaining budget (its SLO from
  arrival; a deferral keeps the original deadline, as the forwarded budget header does) and
  the profiled latency of the batch as taken;
- gate: after a batch, a query is deferred when `deferral.should_defer(confidence,
  threshold)`, to the stage the plan names as `next_stage` (the next variant before any plan
  names one); the next stage generates from scratch;
- degrade (when the policy enables it, like the real worker's failed forward): a deferral
  that finds no ready replica in its next stage, or that the next stage drops at dequeue, is
  answered with the deferring stage's image at that moment.

The controller sees the cluster as the operator does: a simulated Prometheus scrapes the
workers' counters and gauges every `scrape_interval_s`, and at every control tick one
`MetricsReading` (irate of the arrival counters, queue depth gauges) goes through the same
`snapshot_builder.build_snapshot` the operator and `diffcascade up` use, with the same
bounded demand history. Replica changes come from the policy at each tick: new replicas
become ready after their stage's `startup_s` (the paper assumed none); removed replicas
finish their running batch (drain) and their queued queries go back through the
dispatcher. The replicas of the first plan are ready at t = 0.

Hybrid cascades (HADIS): arrivals enter at the plan's entry stage (`Plan.entry_stage`, the
first variant unless named); an entry worker with a router sends the top-r share of prompts
by router score (`sim.routing`, HADIS's percentile rule) straight to the stage it defers to,
before any image is made. A policy may instead assign every GPU worker a role one by one
(`Directive.roles`: stage, batch, escalation share c, router share r, next stage), as
HADIS's controller does; a worker then keeps its queue when its model changes. Workers can
admit a query until `admission_factor` x the SLO after its arrival (HADIS's workers: 1.5),
and dispatch can be uniformly random (HADIS's load balancer).
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from diffcascade_worker.deadline import should_drop
from diffcascade_worker.deferral import should_defer
from diffcascade_worker.routing.rule import Target, route

from diffcascade_operator.control import step_due
from diffcascade_operator.live_profiles import (
    HistogramRecorder,
    LiveObservations,
    LiveProfileResult,
    LiveProfileSettings,
    LiveTracker,
)
from diffcascade_operator.metrics_source import MetricsReading
from diffcascade_operator.plan import Plan
from diffcascade_operator.profiles import CascadeProfiles
from diffcascade_operator.queueing import Dispatch
from diffcascade_operator.router_config import router_view
from diffcascade_operator.sim.model import Directive, Routing, StageModel, WorkerRole
from diffcascade_operator.sim.prometheus import SimulatedPrometheus
from diffcascade_operator.sim.routing import escalation_cut, is_routed, router_cut
from diffcascade_operator.snapshot import DemandSample, Snapshot
from diffcascade_operator.snapshot_builder import (
    DEMAND_HISTORY,
    LiveCache,
    build_snapshot,
    read_live_profiles,
)
from diffcascade_operator.spec import CascadeSpec

NOT_SERVED = -1


class Policy(Protocol):
    """A controller: called at t = 0 (previous None) and every control interval."""

    name: str
    degrade: bool  # answer with the earlier stage's image when a deferral cannot be served

    def decide(self, snapshot: Snapshot, previous: Plan | None) -> Directive: ...


class Observer(Protocol):
    """A policy that also watches every scrape (the DiffServe artifact's 1-s controller tick)."""

    def observe(self, reading: MetricsReading) -> None: ...


@dataclass(frozen=True)
class ClusterTick:
    """What HADIS's controller counts itself every second (it reads no Prometheus).

    `in_system`: queries a worker has seen and the sink has not, younger than 2 x SLO (a
    query dropped by a worker stays counted until then, as in the artifact's bookkeeping);
    `arrivals`: per stage, queries its workers registered since the last tick (a routed or
    escalated query registers at every stage it passes); `queue`: per stage, queued queries.
    """

    at: float
    in_system: int
    arrivals: tuple[int, ...]
    queue: tuple[int, ...]


class ClusterObserver(Protocol):
    def observe_cluster(self, tick: ClusterTick) -> None: ...


@dataclass(frozen=True)
class EngineConfig:
    slo_s: float
    interval_s: float = 5.0
    dispatch: Dispatch = Dispatch.LEAST_LOADED
    scrape_interval_s: float = 1.0  # the simulated Prometheus's scrape interval
    demand_history: int = DEMAND_HISTORY  # demand samples kept, as the operator keeps them
    max_batch_wait_s: float = 0.0  # spec.control.maxBatchWaitMs, applied by every worker
    #: Live profiles as the operator derives them (for policies that plan with them).
    live: LiveProfileSettings = field(default_factory=LiveProfileSettings)
    seed: int = 0  # coin flips of query-agnostic routing (and of random dispatch)
    #: A worker refuses a query at dequeue when its batch would end later than this many
    #: SLOs after the query's arrival (1.0: our worker's deadline rule; HADIS's 1.5).
    admission_factor: float = 1.0


@dataclass(frozen=True)
class DecisionRecord:
    at: float
    plan: Plan
    routing: Routing
    wall_ms: float  # the policy call, measured
    cpu_ms: float  # the policy call's CPU time in this process (steadier on a busy machine)
    solve_ms: float  # what the plan reports for its solver
    solved: bool  # the plan came from a solver run (not held, initial or fixed)
    snapshot: Snapshot | None = None  # what the policy was given
    reading: MetricsReading | None = None  # what the simulated Prometheus answered
    live: LiveObservations | None = None  # the histogram increases over the live window
    profiles: LiveProfileResult | None = None  # what the policy planned with (live policies)


@dataclass(frozen=True)
class TimelineRow:
    """Cluster state at the end of one simulated second."""

    second: int
    threshold: float
    replicas: tuple[int, ...]  # ready, per stage
    replicas_total: tuple[int, ...]  # starting + ready, per stage (draining excluded)
    queue: tuple[int, ...]  # queued (not running) per stage, incl. a stage's backlog
    demand_qps: float  # the plan's demand estimate


@dataclass(frozen=True)
class SimResult:
    stage_names: tuple[str, ...]
    slo_s: float
    arrival_s: Sequence[float]
    finish_s: Sequence[float]  # nan when dropped
    served_by: Sequence[int]  # stage index whose image was returned; -1 when dropped
    deferred: Sequence[bool]  # the gate sent it to a later stage
    degraded: Sequence[bool]  # a deferral returned the earlier stage's image instead
    dropped_s: Sequence[float]  # when it was dropped (nan when served)
    decisions: tuple[DecisionRecord, ...]
    timeline: tuple[TimelineRow, ...]
    gpu_seconds: float
    end_s: float
    wall_s: float = field(default=0.0)
    routed: Sequence[bool] = ()  # sent past the entry stage by the router, before any image
    entered_at: Sequence[int] = ()  # stage index each query entered at
    #: (time, stage index) of every registration of a query at a stage's worker, in order
    registrations: Sequence[tuple[float, int]] = ()


class _Worker:
    __slots__ = (
        "batch_size",
        "busy",
        "busy_until",
        "created",
        "draining",
        "key",
        "next_index",
        "queue",
        "ready_at",
        "recorder",
        "removed_at",
        "router_cut",
        "stage_index",
        "threshold",
        "wake_at",
    )

    def __init__(self, now: float, ready_at: float, key: str, stage: _Stage, index: int) -> None:
        self.key = key  # the worker's identity for its metrics series
        self.recorder = HistogramRecorder()  # what its /metrics exports for live profiles
        self.queue: deque[int] = deque()
        self.wake_at = math.nan  # a pending batch-wait wake-up
        self.busy = False
        self.busy_until = 0.0
        self.created = now
        self.ready_at = ready_at
        self.draining = False
        self.removed_at = math.nan
        self.stage_index = index
        # what it runs: its stage's settings, or its own role (Directive.roles)
        self.batch_size = stage.batch_size
        self.threshold = stage.threshold
        self.next_index = stage.next_index
        self.router_cut = stage.router_cut

    def load(self) -> int:
        return len(self.queue) + (1 if self.busy else 0)


class _Stage:
    __slots__ = (
        "backlog",
        "batch_size",
        "model",
        "next_index",
        "retired",
        "router_cut",
        "rr",
        "threshold",
        "workers",
    )

    def __init__(self, model: StageModel) -> None:
        self.model = model
        self.workers: list[_Worker] = []  # starting, ready or draining
        self.retired: list[_Worker] = []  # removed (kept for GPU accounting)
        self.backlog: deque[int] = deque()  # queries with no ready worker to go to
        self.batch_size = 1
        self.threshold = 0.0
        self.next_index: int | None = None  # where this stage's deferrals go
        self.router_cut: float | None = None  # router score cut of its workers (None: off)
        self.rr = 0

    def ready(self, now: float) -> list[_Worker]:
        return [w for w in self.workers if not w.draining and w.ready_at <= now]


# event kinds, ordered so that at equal times completions free workers before arrivals, and
# a scrape at a tick's instant is seen by that tick
_DONE, _READY, _ARRIVAL, _WAKE, _SCRAPE, _TICK, _SAMPLE = range(7)


class Simulation:
    def __init__(
        self,
        *,
        spec: CascadeSpec,
        profiles: CascadeProfiles,
        stages: Sequence[StageModel],
        arrivals_s: Sequence[float],
        prompts: Sequence[int],
        confidences: Sequence[Sequence[float] | None],
        policy: Policy,
        config: EngineConfig,
        clock: Callable[[], float] = time.perf_counter,
        router_scores: Sequence[float] | None = None,
    ) -> None:
        if len(stages) < 1:
            raise ValueError("a cascade needs at least one stage")
        self.spec = spec
        self.profiles = profiles
        self.stages = [_Stage(m) for m in stages]
        self.arrival = list(arrivals_s)
        self.prompt = list(prompts)
        self.conf = list(confidences)
        self.router_scores = list(router_scores) if router_scores else None
        self._sorted_router = sorted(self.router_scores) if self.router_scores else []
        self._sorted_conf: dict[int, list[float]] = {}
        self.policy = policy
        self.cfg = config
        self.clock = clock
        n = len(self.arrival)
        self.finish = [math.nan] * n
        self.served_by = [NOT_SERVED] * n
        self.deferred = [False] * n
        self.degraded = [False] * n
        self.dropped = [math.nan] * n
        self.enqueued = [0.0] * n  # when the query joined its current worker's queue
        self.origin = [0] * n  # the stage that deferred it (its own stage until deferred)
        self.entered = [-1] * n  # the stage it entered the cascade at
        self.current = [-1] * n  # the stage it is at now
        self.inflight = [0] * len(stages)  # per stage: admitted, not answered (the gauge)
        self.heap: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.now = 0.0
        self.plan: Plan | None = None
        self.routing = Routing.GATE
        self.defer_p = 0.0
        self.rng = random.Random(config.seed)
        self.dispatch_rng = random.Random(config.seed + 1)
        self.route_rng = random.Random(config.seed + 2)  # the product router's draws
        #: The product router of the plan in force (`rule.route`): entry stage index, heavy
        #: stage index, router share, exploration share; None when it routes nothing.
        self.product_router: tuple[int, int, float, float] | None = None
        self.explored = [False] * n
        self.routed = [False] * n
        self.registrations: list[tuple[float, int]] = []
        self.registered = [0] * len(stages)  # per stage, cumulative (ClusterTick.arrivals)
        self._tick_registered = [0] * len(stages)
        self.arrived_count = 0
        self.entry_index = 0
        self.entry_pool: list[int] = []  # stages sharing client traffic per worker
        self.pool: list[_Worker] = []  # GPU workers in registration order (Directive.roles)
        self.decisions: list[DecisionRecord] = []
        self.timeline: list[TimelineRow] = []
        self.prometheus = SimulatedPrometheus(
            stages=[st.model.name for st in self.stages],
            retention=math.ceil(config.interval_s / config.scrape_interval_s) + 3,
        )
        self.history: deque[DemandSample] = deque(maxlen=config.demand_history)
        self._reading: MetricsReading | None = None  # what this tick read
        self.live_tracker = LiveTracker(config.live.window_s, source="Prometheus")
        self._live: LiveObservations | None = None  # a fresh histogram read at this tick
        self.live_cache = LiveCache()
        self._live_result: LiveProfileResult | None = None
        self.workers_made = 0
        self.end_of_trace = 0.0
        self.last_regular = 0.0  # when the last regular control step ran

    # --- event plumbing --------------------------------------------------------------------

    def _push(self, at: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, kind, self.seq, payload))

    def run(self) -> SimResult:
        started = self.clock()
        end_of_trace = self.arrival[-1] if self.arrival else 0.0
        for qid, at in enumerate(self.arrival):
            self._push(at, _ARRIVAL, qid)
        self.end_of_trace = end_of_trace
        self._control(0.0)
        self._push(0.0, _SAMPLE, 0)
        self._push(0.0, _SCRAPE, 0)
        last_work = 0.0
        while self.heap:
            at, kind, _, payload = heapq.heappop(self.heap)
            self.now = at
            if kind not in (_SAMPLE, _SCRAPE, _WAKE):
                last_work = at
            if kind == _ARRIVAL:
                assert isinstance(payload, int)
                self._enter(payload)
            elif kind == _DONE:
                assert isinstance(payload, tuple)
                self._batch_done(payload[0], payload[1], payload[2])
            elif kind == _READY:
                assert isinstance(payload, tuple)
                self._worker_ready(payload[0], payload[1])
            elif kind == _WAKE:
                assert isinstance(payload, tuple)
                self._wake(payload[0], payload[1])
            elif kind == _SCRAPE:
                assert isinstance(payload, int)
                self._scrape()
                nxt = payload + 1
                if nxt * self.cfg.scrape_interval_s <= end_of_trace:
                    self._push(nxt * self.cfg.scrape_interval_s, _SCRAPE, nxt)
                if at > 0 and self._early_step_due(at):
                    self._control(at, early=True)
            elif kind == _TICK:
                self._control(at)
            else:
                assert isinstance(payload, int)
                self._sample(payload)
                if self.heap or payload + 1 <= end_of_trace:  # sample until the work is done
                    self._push(float(payload + 1), _SAMPLE, payload + 1)
        end = max(last_work, end_of_trace)
        for stage in self.stages:  # queries stranded without a worker are dropped at the end
            while stage.backlog:
                self._drop(stage.backlog.popleft(), end)
        return SimResult(
            stage_names=tuple(s.model.name for s in self.stages),
            slo_s=self.cfg.slo_s,
            arrival_s=self.arrival,
            finish_s=self.finish,
            served_by=self.served_by,
            deferred=self.deferred,
            degraded=self.degraded,
            dropped_s=self.dropped,
            decisions=tuple(self.decisions),
            timeline=tuple(self.timeline),
            gpu_seconds=self._gpu_seconds(end),
            end_s=end,
            wall_s=self.clock() - started,
            routed=self.routed,
            entered_at=self.entered,
            registrations=tuple(self.registrations),
        )

    # --- queries ---------------------------------------------------------------------------

    def _enter(self, qid: int) -> None:
        self.arrived_count += 1
        self.prometheus.entered()
        if self.entry_pool:
            ready = [(k, w) for k in self.entry_pool for w in self.stages[k].ready(self.now)]
            if not ready:
                self._dispatch(self.entry_pool[0], qid)
                return
            k, picked = ready[self.dispatch_rng.randrange(len(ready))]
            self._dispatch(k, qid, picked)
            return
        index = len(self.stages) - 1 if self.routing == Routing.LAST_ONLY else self.entry_index
        if self.product_router is not None and self.router_scores is not None:
            self._route_product(qid)
            return
        stage = self.stages[index]
        if self.router_scores is None or not any(w.router_cut is not None for w in stage.workers):
            self._dispatch(index, qid)
            return
        # HADIS's router: inside the light worker, by its percentile index rule
        worker = self._pick(stage)
        if worker is not None and worker.router_cut is not None and worker.next_index is not None:
            score = self.router_scores[self.prompt[qid] % len(self.router_scores)]
            if is_routed(score, worker.router_cut):
                # registered at the entry worker, then sent on before any image is made
                self.routed[qid] = True
                self.prometheus.arrived(index)
                self._register(index)
                self._dispatch(worker.next_index, qid)
                return
        self._dispatch(index, qid, worker)

    def _route_product(self, qid: int) -> None:
        """The product's router (the `<cascade>` Service): the worker package's own rule
        (`routing.rule.route`: r = 0 routes nothing, ties at the cut split in proportion,
        an exploration share of would-be-heavy prompts goes through the entry anyway), before
        any worker sees the query; a routed query registers at the heavy stage only."""
        assert self.product_router is not None and self.router_scores is not None
        entry, heavy, share, exploration = self.product_router
        score = self.router_scores[self.prompt[qid] % len(self.router_scores)]
        decision = route(
            score,
            share=share,
            sorted_scores=self._sorted_router,
            exploration=exploration,
            draw=self.route_rng.random(),
            tie_draw=self.route_rng.random(),
        )
        if decision.target is Target.HEAVY:
            self.routed[qid] = True
            self._dispatch(heavy, qid)
            return
        self.explored[qid] = decision.explored
        self._dispatch(entry, qid)

    def _register(self, index: int) -> None:
        self.registrations.append((self.now, index))
        self.registered[index] += 1

    def _pick(self, stage: _Stage) -> _Worker | None:
        ready = stage.ready(self.now)
        if not ready:
            return None
        if self.cfg.dispatch == Dispatch.RANDOM:
            return ready[self.dispatch_rng.randrange(len(ready))]
        if self.cfg.dispatch == Dispatch.ROUND_ROBIN:
            stage.rr = (stage.rr + 1) % len(ready)
            return ready[stage.rr]
        # least loaded; ties broken round-robin so equal workers share the load
        stage.rr += 1
        count = len(ready)
        best = ready[stage.rr % count]
        best_load = best.load()
        for k in range(1, count):
            worker = ready[(stage.rr + k) % count]
            load = worker.load()
            if load < best_load:
                best, best_load = worker, load
        return best

    def _dispatch(self, index: int, qid: int, worker: _Worker | None = None) -> None:
        stage = self.stages[index]
        self.prometheus.arrived(index)
        self._register(index)
        self.inflight[index] += 1
        if self.entered[qid] < 0:
            self.entered[qid] = index
        self.current[qid] = index
        target = worker or self._pick(stage)
        if target is None:
            stage.backlog.append(qid)
            return
        self._enqueue(index, target, qid)

    def _enqueue(self, index: int, worker: _Worker, qid: int) -> None:
        self.enqueued[qid] = self.now
        worker.queue.append(qid)
        if not worker.busy:
            self._start_batch(index, worker)

    def _wake(self, index: int, worker: _Worker) -> None:
        if worker.wake_at == self.now:
            worker.wake_at = math.nan
            if not worker.busy and worker in self.stages[index].workers:
                self._start_batch(index, worker)

    def _start_batch(self, index: int, worker: _Worker) -> None:
        """Take up to b queued queries; drop (or degrade) those that cannot finish in time.

        Like the real worker's batcher: an idle worker with fewer than b queued waits for a
        fuller batch until the oldest has waited `max_batch_wait_s`; the deadline check
        (`deadline.should_drop`) uses the latency of the batch as taken, and the survivors
        run as one batch without refilling it.
        """
        stage = self.stages[index]
        queue = worker.queue
        wait = self.cfg.max_batch_wait_s
        if wait > 0 and queue and len(queue) < max(1, worker.batch_size) and not worker.draining:
            due = self.enqueued[queue[0]] + wait
            if due > self.now:
                if worker.wake_at != due:
                    worker.wake_at = due
                    self._push(due, _WAKE, (index, worker))
                return
        degrade = self.policy.degrade
        slo = self.cfg.slo_s * self.cfg.admission_factor
        while queue:
            taken = [queue.popleft() for _ in range(min(max(1, worker.batch_size), len(queue)))]
            expected = stage.model.latency(len(taken))
            batch: list[int] = []
            for qid in taken:
                remaining = self.arrival[qid] + slo - self.now
                if not should_drop(remaining_s=remaining, expected_batch_s=expected):
                    batch.append(qid)
                elif degrade and self.deferred[qid]:
                    self._degrade(qid)  # the next stage refuses it (503)
                else:
                    self._drop(qid, self.now)
            if batch:
                worker.busy = True
                worker.busy_until = self.now + stage.model.latency(len(batch))
                self._push(worker.busy_until, _DONE, (index, worker, batch))
                return

    def _batch_done(self, index: int, worker: _Worker, batch: list[int]) -> None:
        worker.busy = False
        gated = self.conf[index] is not None
        worker.recorder.observe_batch(
            size=len(batch),
            seconds=self.stages[index].model.latency(len(batch)),
            confidences=[self._confidence(index, q) for q in batch] if gated else (),
        )
        target_index = worker.next_index
        for qid in batch:
            if target_index is None or not self._defers(index, qid, worker.threshold):
                self._serve(qid, index)
                continue
            self.deferred[qid] = True
            self.origin[qid] = index
            target = self._pick(self.stages[target_index])
            if target is None and self.policy.degrade:
                self._degrade(qid)  # no ready replica to forward to: the forward fails
            else:
                self._dispatch(target_index, qid, target)
        if worker.draining:
            self._retire(self.stages[index], worker)
        elif worker.queue:
            self._start_batch(worker.stage_index, worker)

    def _defers(self, index: int, qid: int, threshold: float) -> bool:
        if self.routing == Routing.RANDOM:
            return self.rng.random() < self.defer_p
        if self.conf[index] is None:
            return threshold >= 1.0
        return should_defer(self._confidence(index, qid), threshold)

    def _confidence(self, index: int, qid: int) -> float:
        """The gate confidence of query `qid`'s prompt at a gated stage."""
        conf = self.conf[index]
        assert conf is not None
        return conf[self.prompt[qid] % len(conf)]

    def _serve(self, qid: int, index: int, *, at: float | None = None) -> None:
        self.finish[qid] = self.now if at is None else at
        self.served_by[qid] = index
        self._close(qid)

    def _degrade(self, qid: int) -> None:
        """A deferral that failed: the stage that deferred it answers with its own image, at
        the latest at the deadline (the real forward times out there)."""
        self.degraded[qid] = True
        deadline = self.arrival[qid] + self.cfg.slo_s
        self._serve(qid, self.origin[qid], at=min(self.now, deadline))

    def _drop(self, qid: int, at: float) -> None:
        self.dropped[qid] = at
        self._close(qid)

    def _close(self, qid: int) -> None:
        """The query left the cascade: the stages holding it no longer count it in flight."""
        self.inflight[self.entered[qid]] -= 1
        if self.current[qid] != self.entered[qid]:
            self.inflight[self.current[qid]] -= 1

    # --- replicas --------------------------------------------------------------------------

    def _worker_ready(self, index: int, worker: _Worker) -> None:
        if worker.draining:
            return
        stage = self.stages[index]
        pending = list(stage.backlog)
        stage.backlog.clear()
        for qid in pending:
            self._redispatch(index, qid)
        if worker.queue and not worker.busy:
            self._start_batch(index, worker)

    def _redispatch(self, index: int, qid: int) -> None:
        """Send an already counted query back through the dispatcher."""
        stage = self.stages[index]
        target = self._pick(stage)
        if target is None:
            if self.policy.degrade and self.deferred[qid]:
                self._degrade(qid)
            else:
                stage.backlog.append(qid)
            return
        self._enqueue(index, target, qid)

    def _retire(self, stage: _Stage, worker: _Worker) -> None:
        worker.removed_at = self.now
        stage.workers.remove(worker)
        stage.retired.append(worker)

    def _scale(self, index: int, desired: int, initial: bool) -> None:
        stage = self.stages[index]
        active = [w for w in stage.workers if not w.draining]
        if desired > len(active):
            delay = 0.0 if initial else stage.model.startup_s
            for _ in range(desired - len(active)):
                self.workers_made += 1
                worker = _Worker(self.now, self.now + delay, str(self.workers_made), stage, index)
                stage.workers.append(worker)
                if delay > 0:
                    self._push(worker.ready_at, _READY, (index, worker))
            if delay == 0 and stage.backlog:
                self._worker_ready(index, stage.workers[-1])
            return
        if desired == len(active):
            return
        # remove workers still starting first (latest first), then the least loaded
        victims = sorted(active, key=lambda w: (w.ready_at <= self.now, w.load(), -w.ready_at))
        orphans: list[int] = []
        for worker in victims[: len(active) - desired]:
            worker.draining = True
            orphans.extend(worker.queue)
            worker.queue.clear()
            if not worker.busy:
                self._retire(stage, worker)
        orphans.sort(key=lambda qid: self.arrival[qid])
        for qid in orphans:
            self._redispatch(index, qid)

    def _apply(self, directive: Directive, initial: bool) -> None:
        plan = directive.plan
        self.plan = plan
        self.routing = directive.routing
        self.defer_p = directive.defer_probability
        by_name = {v.name: v for v in plan.variants}
        names = [stage.model.name for stage in self.stages]
        self.entry_index = names.index(plan.entry()) if plan.entry() in names else 0
        self.entry_pool = [names.index(n) for n in directive.entry_stages or () if n in names]
        self.product_router = None
        if directive.roles is not None:
            self._apply_roles(directive.roles, names)
            return
        view = router_view(plan, self.spec)
        if view.share > 0 and view.heavy in names and self.spec.router is not None:
            exploration = self.spec.router.effective_exploration()
            heavy = names.index(view.heavy)
            self.product_router = (self.entry_index, heavy, view.share, exploration)
        # batch sizes, thresholds and routes change in place (no reload), before replicas move
        for index, stage in enumerate(self.stages):
            alloc = by_name.get(stage.model.name)
            if alloc is not None:
                stage.batch_size = max(1, alloc.batch_size)
                stage.threshold = alloc.threshold if alloc.threshold is not None else 0.0
                if alloc.next_stage is not None and alloc.next_stage in names:
                    stage.next_index = names.index(alloc.next_stage)
                else:
                    stage.next_index = index + 1 if index + 1 < len(names) else None
            stage.router_cut = None  # plans route in the product's router (`_route_product`)
            for worker in stage.workers:
                worker.batch_size = stage.batch_size
                worker.threshold = stage.threshold
                worker.next_index = stage.next_index
                worker.router_cut = stage.router_cut
        for index, stage in enumerate(self.stages):
            alloc = by_name.get(stage.model.name)
            self._scale(index, alloc.replicas if alloc is not None else 0, initial)
        # idle workers may now have work (new batch size, re-dispatched queries)
        for index, stage in enumerate(self.stages):
            for worker in stage.ready(self.now):
                if worker.queue and not worker.busy:
                    self._start_batch(index, worker)

    def _apply_roles(self, roles: Sequence[WorkerRole], names: list[str]) -> None:
        """Give worker k the k-th role; a worker that changes model keeps its queue."""
        while len(self.pool) < len(roles):
            self.workers_made += 1
            first = names.index(roles[len(self.pool)].stage)
            worker = _Worker(self.now, self.now, str(self.workers_made), self.stages[first], first)
            self.stages[first].workers.append(worker)
            self.pool.append(worker)
        for worker, role in zip(self.pool, roles, strict=False):
            index = names.index(role.stage)
            if index != worker.stage_index:
                self.stages[worker.stage_index].workers.remove(worker)
                self.stages[index].workers.append(worker)
                worker.stage_index = index
            worker.batch_size = max(1, role.batch_size)
            worker.threshold = 0.0
            if role.escalate_share > 0 and self.conf[index] is not None:
                cuts = self._sorted_confidences(index)
                worker.threshold = escalation_cut(cuts, role.escalate_share)
            worker.next_index = names.index(role.next_stage) if role.next_stage else None
            worker.router_cut = None
            if role.router_share is not None and self._sorted_router:
                worker.router_cut = router_cut(self._sorted_router, role.router_share)
        for index, stage in enumerate(self.stages):
            if stage.backlog and stage.ready(self.now):
                self._worker_ready(index, stage.ready(self.now)[0])
            for worker in stage.ready(self.now):
                if worker.queue and not worker.busy:
                    self._start_batch(index, worker)

    def _sorted_confidences(self, index: int) -> list[float]:
        cached = self._sorted_conf.get(index)
        if cached is None:
            conf = self.conf[index]
            assert conf is not None
            cached = self._sorted_conf[index] = sorted(conf)
        return cached

    # --- control ---------------------------------------------------------------------------

    def _early_step_due(self, now: float) -> bool:
        """An extra step at a scrape, for policies on the product's cadence
        (`control.step_due`: the plan made before any reading is replaced at the first
        reading, not at the next interval); the regular ticks stay where they were."""
        if not getattr(self.policy, "product_cadence", False) or not self.decisions:
            return False
        since = now - self.last_regular
        due = step_due(self.plan, since_last_s=since, interval_s=self.cfg.interval_s)
        return due is None and now > self.decisions[-1].at

    def _control(self, now: float, *, early: bool = False) -> None:
        """One control step; a regular one schedules the next an interval later (as the
        operator's timer steps once `intervalSeconds` have passed since its last step)."""
        if not early:
            self.last_regular = now
            if now + self.cfg.interval_s <= self.end_of_trace + 1e-9:
                self._push(now + self.cfg.interval_s, _TICK, None)
        snapshot = self.snapshot(now)
        started, cpu_started = self.clock(), time.process_time()
        directive = self.policy.decide(snapshot, self.plan)
        wall_ms = (self.clock() - started) * 1000.0
        cpu_ms = (time.process_time() - cpu_started) * 1000.0
        plan = directive.plan
        self.decisions.append(
            DecisionRecord(
                at=now,
                plan=plan,
                routing=directive.routing,
                wall_ms=wall_ms,
                cpu_ms=cpu_ms,
                solve_ms=plan.solver.solve_ms,
                solved=directive.solved,
                snapshot=snapshot,
                reading=self._reading,
                live=self._live,
                profiles=self._live_result,
            )
        )
        self._apply(directive, initial=self.plan is None)

    def snapshot(self, now: float) -> Snapshot:
        """What the operator's control step would build at `now`: one reading of the simulated
        Prometheus through the shared snapshot builder, into the bounded demand history, with
        the live profiles derived from the workers' histograms when the policy plans with them
        (the operator's path: `read_live_profiles`, then `build_snapshot`)."""
        reading = self._reading = self.prometheus.read(now, window_s=self.cfg.interval_s)
        self._live, self._live_result = None, None
        profiles = self.profiles
        if getattr(self.policy, "live_profiles", False):
            self._live_result, _ = read_live_profiles(
                self if reading is not None else None,  # no reading: no histograms either
                profiles=self.profiles,
                cascade="simulated",
                variants=[s.model.name for s in self.stages],
                plan=self.plan,
                settings=self.cfg.live,
                cache=self.live_cache,
                now=now,
            )
            profiles = self._live_result.profiles
        return build_snapshot(
            spec=self.spec,
            profiles=profiles,
            now=now,
            history=self.history,
            reading=reading,
            ready_replicas={s.model.name: len(s.ready(now)) for s in self.stages},
            dispatch=self.cfg.dispatch,
            entry=self.plan.entry() if self.plan is not None else None,
        )

    def read_live(
        self,
        *,
        cascade: str,
        variants: Sequence[str],
        window_s: float,
        namespace: str | None = None,
    ) -> LiveObservations:
        """The workers' histograms as the operator's source reads them (called by
        `read_live_profiles` when its cache says a read is due)."""
        totals = {
            (s.model.name, w.key): w.recorder.totals() for s in self.stages for w in s.workers
        }
        self._live = self.live_tracker.observe(now=self.now, variants=variants, totals=totals)
        return self._live

    def _scrape(self) -> None:
        """Every worker's /metrics as Prometheus would scrape it at this instant."""
        self.prometheus.scrape(
            self.now,
            queue_depth=[sum(len(w.queue) for w in s.workers) for s in self.stages],
            inflight=list(self.inflight),
        )
        observe = getattr(self.policy, "observe", None)
        if observe is not None:
            reading = self.prometheus.read(self.now)
            if reading is not None:
                observe(reading)
        observe_cluster = getattr(self.policy, "observe_cluster", None)
        if observe_cluster is not None:
            observe_cluster(self._cluster_tick())

    def _cluster_tick(self) -> ClusterTick:
        horizon = self.now - 2.0 * self.cfg.slo_s
        in_system = 0
        for qid in range(self.arrived_count - 1, -1, -1):
            if self.arrival[qid] <= horizon:
                break
            if self.served_by[qid] == NOT_SERVED:
                in_system += 1
        arrivals = tuple(
            now - before for now, before in zip(self.registered, self._tick_registered, strict=True)
        )
        self._tick_registered = list(self.registered)
        return ClusterTick(
            at=self.now,
            in_system=in_system,
            arrivals=arrivals,
            queue=tuple(sum(len(w.queue) for w in s.workers) for s in self.stages),
        )

    def _sample(self, second: int) -> None:
        now = float(second)
        self.timeline.append(
            TimelineRow(
                second=second,
                threshold=self.stages[0].threshold,
                replicas=tuple(len(s.ready(now)) for s in self.stages),
                replicas_total=tuple(
                    sum(1 for w in s.workers if not w.draining) for s in self.stages
                ),
                queue=tuple(
                    sum(len(w.queue) for w in s.workers) + len(s.backlog) for s in self.stages
                ),
                demand_qps=self.plan.demand_qps if self.plan is not None else 0.0,
            )
        )

    def _gpu_seconds(self, end: float) -> float:
        total = 0.0
        for stage in self.stages:
            gpus = stage.model.gpus_per_replica
            for worker in (*stage.workers, *stage.retired):
                until = worker.removed_at if not math.isnan(worker.removed_at) else end
                total += max(0.0, until - worker.created) * gpus
        return total
