"""Discrete-event simulation of a cascade in virtual time (a heap of events, no sleeping).

Each replica is a worker with its own FIFO queue, fed by a stage-level dispatcher (least
loaded by default, like a queue-aware load balancer; round-robin as an option, closer to a
Kubernetes Service). Workers follow the real worker's rules:

- batching: when idle, take up to `b` queued queries at once (no waiting to fill a batch);
- drop at dequeue: a query whose elapsed time plus the batch's profiled latency exceeds
  `drop_factor` x SLO is dropped instead of run;
- gate: after a light batch, a query is deferred when its prompt's reference confidence is
  below the threshold (a threshold >= 1 defers every query); the next stage generates
  from scratch;
- degrade (when the policy enables it, like the real worker's failed forward): a deferral
  that finds no ready replica in the next stage, or that the next stage finds at dequeue
  cannot finish by the SLO, is answered with the deferring stage's image at that moment.

Replica changes come from the policy at each controller tick: new replicas become ready
after their stage's `startup_s` (the paper assumed none); removed replicas finish their
running batch (drain) and their queued queries go back through the dispatcher. The replicas
of the first plan are ready at t = 0.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from diffcascade_operator.plan import Plan
from diffcascade_operator.profiles import CascadeProfiles
from diffcascade_operator.sim.model import Directive, Routing, StageModel
from diffcascade_operator.snapshot import DemandSample, Snapshot, StageSample
from diffcascade_operator.spec import CascadeSpec

NOT_SERVED = -1


class Dispatch(StrEnum):
    LEAST_LOADED = "least-loaded"
    ROUND_ROBIN = "round-robin"


class Policy(Protocol):
    """A controller: called at t = 0 (previous None) and every control interval."""

    name: str
    degrade: bool  # answer with the earlier stage's image when a deferral cannot be served

    def decide(self, snapshot: Snapshot, previous: Plan | None) -> Directive: ...


@dataclass(frozen=True)
class EngineConfig:
    slo_s: float
    interval_s: float = 5.0
    drop_factor: float = 1.5  # drop at dequeue past drop_factor x SLO (the paper's 1.5)
    dispatch: Dispatch = Dispatch.LEAST_LOADED
    rate_window_s: float = 5.0  # demand samples: arrivals over this window (Prometheus rate())
    sample_period_s: float = 1.0  # one demand sample per period
    demand_history_s: float = 60.0  # how many seconds of samples a snapshot carries
    seed: int = 0  # coin flips of query-agnostic routing


@dataclass(frozen=True)
class DecisionRecord:
    at: float
    plan: Plan
    routing: Routing
    wall_ms: float  # the policy call, measured
    cpu_ms: float  # the policy call's CPU time in this process (steadier on a busy machine)
    solve_ms: float  # what the plan reports for its solver
    solved: bool  # the plan came from a solver run (not held, initial or fixed)


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


class _Worker:
    __slots__ = ("busy", "busy_until", "created", "draining", "queue", "ready_at", "removed_at")

    def __init__(self, now: float, ready_at: float) -> None:
        self.queue: deque[int] = deque()
        self.busy = False
        self.busy_until = 0.0
        self.created = now
        self.ready_at = ready_at
        self.draining = False
        self.removed_at = math.nan

    def load(self) -> int:
        return len(self.queue) + (1 if self.busy else 0)


class _Stage:
    __slots__ = (
        "arrivals",
        "backlog",
        "batch_size",
        "model",
        "retired",
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
        self.rr = 0
        self.arrivals: list[int] = []  # arrivals per whole second

    def ready(self, now: float) -> list[_Worker]:
        return [w for w in self.workers if not w.draining and w.ready_at <= now]


# event kinds, ordered so that at equal times completions free workers before arrivals
_DONE, _READY, _ARRIVAL, _TICK, _SAMPLE = range(5)


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
    ) -> None:
        if len(stages) < 1:
            raise ValueError("a cascade needs at least one stage")
        self.spec = spec
        self.profiles = profiles
        self.stages = [_Stage(m) for m in stages]
        self.arrival = list(arrivals_s)
        self.prompt = list(prompts)
        self.conf = list(confidences)
        self.policy = policy
        self.cfg = config
        self.clock = clock
        n = len(self.arrival)
        self.finish = [math.nan] * n
        self.served_by = [NOT_SERVED] * n
        self.deferred = [False] * n
        self.degraded = [False] * n
        self.dropped = [math.nan] * n
        self.heap: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.now = 0.0
        self.plan: Plan | None = None
        self.routing = Routing.GATE
        self.defer_p = 0.0
        self.rng = random.Random(config.seed)
        self.decisions: list[DecisionRecord] = []
        self.timeline: list[TimelineRow] = []
        self.entry_arrivals: list[int] = []

    # --- event plumbing --------------------------------------------------------------------

    def _push(self, at: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, kind, self.seq, payload))

    def run(self) -> SimResult:
        started = self.clock()
        end_of_trace = self.arrival[-1] if self.arrival else 0.0
        for qid, at in enumerate(self.arrival):
            self._push(at, _ARRIVAL, qid)
        self._control(0.0)
        ticks = int(end_of_trace // self.cfg.interval_s)
        for k in range(1, ticks + 1):
            self._push(k * self.cfg.interval_s, _TICK, None)
        self._push(0.0, _SAMPLE, 0)
        last_work = 0.0
        while self.heap:
            at, kind, _, payload = heapq.heappop(self.heap)
            self.now = at
            if kind != _SAMPLE:
                last_work = at
            if kind == _ARRIVAL:
                assert isinstance(payload, int)
                self._count(self.entry_arrivals, at)
                self._enter(payload)
            elif kind == _DONE:
                assert isinstance(payload, tuple)
                self._batch_done(payload[0], payload[1], payload[2])
            elif kind == _READY:
                assert isinstance(payload, tuple)
                self._worker_ready(payload[0], payload[1])
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
        )

    @staticmethod
    def _count(buckets: list[int], at: float) -> None:
        second = int(at)
        if second >= len(buckets):
            buckets.extend([0] * (second + 1 - len(buckets)))
        buckets[second] += 1

    # --- queries ---------------------------------------------------------------------------

    def _enter(self, qid: int) -> None:
        index = len(self.stages) - 1 if self.routing == Routing.LAST_ONLY else 0
        self._dispatch(index, qid)

    def _pick(self, stage: _Stage) -> _Worker | None:
        ready = stage.ready(self.now)
        if not ready:
            return None
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
        self._count(stage.arrivals, self.now)
        target = worker or self._pick(stage)
        if target is None:
            stage.backlog.append(qid)
            return
        target.queue.append(qid)
        if not target.busy:
            self._start_batch(index, target)

    def _start_batch(self, index: int, worker: _Worker) -> None:
        """Take up to b queued queries; drop (or degrade) those that cannot finish in time.

        Like the real worker: the check uses the latency of the batch as taken, and the
        survivors run as one batch without refilling it.
        """
        stage = self.stages[index]
        queue = worker.queue
        limit = self.cfg.drop_factor * self.cfg.slo_s
        degrade = self.policy.degrade and index > 0
        while queue:
            taken = [queue.popleft() for _ in range(min(max(1, stage.batch_size), len(queue)))]
            expected = stage.model.latency(len(taken))
            batch: list[int] = []
            for qid in taken:
                elapsed = self.now - self.arrival[qid] + expected
                if degrade and self.deferred[qid] and elapsed > self.cfg.slo_s:
                    # the forwarded budget ran out: the deferring stage answers with its image
                    self.degraded[qid] = True
                    self._serve(qid, index - 1)
                elif elapsed > limit:
                    self._drop(qid, self.now)
                else:
                    batch.append(qid)
            if batch:
                worker.busy = True
                worker.busy_until = self.now + stage.model.latency(len(batch))
                self._push(worker.busy_until, _DONE, (index, worker, batch))
                return

    def _batch_done(self, index: int, worker: _Worker, batch: list[int]) -> None:
        worker.busy = False
        last = index == len(self.stages) - 1
        for qid in batch:
            if last or not self._defers(index, qid):
                self._serve(qid, index)
                continue
            self.deferred[qid] = True
            target = self._pick(self.stages[index + 1])
            if target is None and self.policy.degrade:
                # no ready replica to forward to: the forward fails, this stage's image returns
                self.degraded[qid] = True
                self._serve(qid, index)
            else:
                self._dispatch(index + 1, qid, target)
        if worker.draining:
            self._retire(self.stages[index], worker)
        elif worker.queue:
            self._start_batch(index, worker)

    def _defers(self, index: int, qid: int) -> bool:
        if self.routing == Routing.RANDOM:
            return self.rng.random() < self.defer_p
        threshold = self.stages[index].threshold
        if threshold >= 1.0:
            return True
        conf = self.conf[index]
        if conf is None:
            return False
        return conf[self.prompt[qid] % len(conf)] < threshold

    def _serve(self, qid: int, index: int) -> None:
        self.finish[qid] = self.now
        self.served_by[qid] = index

    def _drop(self, qid: int, at: float) -> None:
        self.dropped[qid] = at

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
            if self.policy.degrade and index > 0 and self.deferred[qid]:
                self.degraded[qid] = True
                self._serve(qid, index - 1)
            else:
                stage.backlog.append(qid)
            return
        target.queue.append(qid)
        if not target.busy:
            self._start_batch(index, target)

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
                worker = _Worker(self.now, self.now + delay)
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
        # batch sizes and thresholds change in place (no reload), before replicas move
        for stage in self.stages:
            alloc = by_name.get(stage.model.name)
            if alloc is not None:
                stage.batch_size = max(1, alloc.batch_size)
                stage.threshold = alloc.threshold if alloc.threshold is not None else 0.0
        for index, stage in enumerate(self.stages):
            alloc = by_name.get(stage.model.name)
            self._scale(index, alloc.replicas if alloc is not None else 0, initial)
        # idle workers may now have work (new batch size, re-dispatched queries)
        for index, stage in enumerate(self.stages):
            for worker in stage.ready(self.now):
                if worker.queue and not worker.busy:
                    self._start_batch(index, worker)

    # --- control ---------------------------------------------------------------------------

    def _control(self, now: float) -> None:
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
            )
        )
        self._apply(directive, initial=self.plan is None)

    def snapshot(self, now: float) -> Snapshot:
        """What the controller would read from Prometheus at `now`."""
        cfg = self.cfg
        samples: list[DemandSample] = []
        at = now
        oldest = max(cfg.sample_period_s, now - cfg.demand_history_s + cfg.sample_period_s)
        points: list[float] = []
        while at >= oldest - 1e-9 and at > 0:
            points.append(at)
            at -= cfg.sample_period_s
        for point in reversed(points):
            samples.append(DemandSample(at=point, qps=self._rate(self.entry_arrivals, point)))
        # Queue depth as the workers report it: a stage's backlog (queries that found no ready
        # replica) sits in no worker, so no metric shows it.
        stages = {
            s.model.name: StageSample(
                queue_depth=float(sum(len(w.queue) for w in s.workers)),
                arrival_qps=self._rate(s.arrivals, now) if now > 0 else 0.0,
            )
            for s in self.stages
        }
        ready = {s.model.name: len(s.ready(now)) for s in self.stages}
        return Snapshot(
            spec=self.spec,
            profiles=self.profiles,
            now=now,
            demand=tuple(samples),
            stages=stages,
            ready_replicas=ready,
            metrics_available=True,
        )

    def _rate(self, buckets: list[int], at: float) -> float:
        """Arrivals per second over the window ending at `at` (whole seconds only)."""
        end = round(at)
        window = max(1, round(self.cfg.rate_window_s))
        start = max(0, end - window)
        if end <= start:
            return 0.0
        total = sum(buckets[start : min(end, len(buckets))])
        return total / (end - start)

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
