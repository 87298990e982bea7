"""The simulator runs the controller the operator runs, fed the way the operator feeds it.

One arrival series through the simulator, then what its simulated Prometheus answered at
each tick through the Kubernetes operator's own `control_step` (snapshot builder, demand
history, decide(), actuation) against a recording API: the plans must be the same, tick by
tick, their entry stage, router share and table row included. No cluster is involved: the
API object records calls, and the pods it lists point at a closed loopback port, so config
pushes fail fast and change nothing.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from diffcascade_operator.control import decide, same_decision
from diffcascade_operator.kube import reconcile
from diffcascade_operator.kube.actuator import PodInfo
from diffcascade_operator.kube.api import KubeApi
from diffcascade_operator.kube.manifests import ROUTER_INDEX_KEY
from diffcascade_operator.kube.settings import OperatorSettings
from diffcascade_operator.live_profiles import LiveObservations
from diffcascade_operator.metrics_source import MetricsReading, MetricsUnavailable
from diffcascade_operator.plan import Plan
from diffcascade_operator.queueing import Dispatch
from diffcascade_operator.router_config import router_view
from diffcascade_operator.sim.engine import DecisionRecord
from diffcascade_operator.sim.run import simulate
from diffcascade_operator.sim.scenarios import Scenario, load_scenario
from diffcascade_operator.sim.traces import Trace


class RecordingApi(KubeApi):
    """The operator's API surface without a cluster: every write is recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        self.calls.append(("scale", (name, replicas)))

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self.calls.append(("annotate", name))

    def patch_configmap_data(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        self.calls.append(("configmap", name))

    def read_token(self, namespace: str, name: str, *, owner: Any) -> str | None:
        return "token"

    def existing(self, children: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
        return {f"{c['kind']}/{c['metadata']['name']}": None for c in children}

    def apply(self, manifest: dict[str, Any], *, existing: Mapping[str, Any] | None = None) -> str:
        self.calls.append(("apply", f"{manifest['kind']}/{manifest['metadata']['name']}"))
        return "created"


class Replay:
    """A metrics source answering what the simulated Prometheus answered, tick by tick: the
    arrival and queue reading, then the histogram increases of the live-profile window."""

    def __init__(
        self,
        readings: Sequence[MetricsReading | None],
        live: Sequence[LiveObservations | None],
    ) -> None:
        self._readings: Iterator[MetricsReading | None] = iter(readings)
        self._live = iter(live)
        self.live_reads = 0

    def read(
        self, *, cascade: str, variants: Sequence[str], namespace: str | None = None
    ) -> MetricsReading:
        reading = next(self._readings)
        if reading is None:
            raise MetricsUnavailable("no rate yet (fewer than two scrapes)")
        return reading

    def read_live(
        self,
        *,
        cascade: str,
        variants: Sequence[str],
        window_s: float,
        namespace: str | None = None,
    ) -> LiveObservations:
        observed = next(self._live)
        assert observed is not None and window_s == observed.window_s
        self.live_reads += 1
        return observed


def ramp(seconds: int = 90, start_qps: float = 4.0, end_qps: float = 12.0) -> Trace:
    rng = random.Random(7)
    arrivals: list[float] = []
    for second in range(seconds):
        qps = start_qps + (end_qps - start_qps) * second / seconds
        at = float(second)
        while True:
            at += rng.expovariate(qps)
            if at >= second + 1:
                break
            arrivals.append(at)
    return Trace("ramp", tuple(arrivals), tuple(rng.randrange(5000) for _ in arrivals))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def replay_through_the_operator(
    scenario: Scenario, trace: Trace
) -> tuple[list[DecisionRecord], list[Plan], list[tuple[Any, ...]], Replay]:
    """The simulator's run, then its readings through the operator's `control_step` with
    the dispatch the simulated cluster ran: (decisions, operator plans, mismatches, replay)."""
    run = simulate(scenario=scenario, trace=trace, policy_name="diffcascade")
    decisions = list(run.result.decisions)
    readings = [d.reading for d in decisions]
    assert sum(r is not None for r in readings) >= len(decisions) - 1
    # The scenario is simulator-only (reference curves, no gates): deployed, its deferring
    # variants need a gate, which the operator's planning never reads.
    deployed = scenario.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    deployed["simulatorOnly"] = False
    for variant in deployed["variants"][:-1]:
        variant["gate"]["discriminator"] = {"uri": "gate.pt"}
    body: dict[str, Any] = {
        "metadata": {"name": "c", "namespace": "ns", "generation": 1, "uid": "u"},
        "spec": deployed,
        "status": {},
    }
    dispatch = Dispatch(run.summary.dispatch)
    settings = OperatorSettings(dispatch=dispatch)
    state = reconcile.new_state(settings)
    fresh = [d.live for d in decisions if d.live is not None]  # histogram reads, as the sim did
    replay = Replay(readings, fresh)
    state.source, state.source_url = replay, scenario.spec.control.prometheus_url
    api = RecordingApi()
    port = closed_port()
    replicas: dict[str, int | None] = {v.name: None for v in scenario.spec.variants}
    replicas[ROUTER_INDEX_KEY] = 1
    plans: list[Plan] = []
    mismatches: list[tuple[Any, ...]] = []
    for index, decision in enumerate(decisions):
        assert decision.snapshot is not None
        assert decision.snapshot.dispatch is dispatch
        pods = [
            PodInfo(f"{name}-{k}", f"{name}-{k}", name, "127.0.0.1", port, ready=True)
            for name, count in decision.snapshot.ready_replicas.items()
            for k in range(count)
        ]
        outcome = reconcile.control_step(
            api=api,
            body=body,
            state=state,
            pods=pods,
            deployment_replicas=replicas,
            settings=settings,
            now=decision.at,
            decide=decide,
            force=True,
        )
        assert outcome is not None and state.plan is not None
        plans.append(state.plan)
        replicas = {**state.plan.replicas(), ROUTER_INDEX_KEY: 1}
        if not same_decision(state.plan, decision.plan):
            mismatches.append((index, decision.at, state.plan.reason, decision.plan.reason))
    return decisions, plans, mismatches, replay


def test_a_ramp_gives_the_same_plans_through_the_simulator_and_the_operator() -> None:
    scenario = load_scenario("sdturbo-sdv15", gpus=8)
    decisions, _, mismatches, replay = replay_through_the_operator(scenario, ramp())
    assert len(decisions) >= 15
    assert mismatches == []
    # the operator read the histograms exactly when the simulator did (every read_every_s)
    fresh = [d.live for d in decisions if d.live is not None]
    assert replay.live_reads == len(fresh) > len(decisions) // 4
    # the series did move the controller: more than one distinct decision was taken
    assert len({d.plan.threshold for d in decisions}) > 1


def test_hybrid_plans_are_the_same_through_the_simulator_and_the_operator() -> None:
    """HADIS's scenario (random dispatch, a quality table, HADIS's router scores): the plans
    name an entry stage past the first variant, a router share and a table row, and the
    operator decides the same ones; what it tells the router is what the simulator routed by."""
    scenario = load_scenario("hadis-sd35")
    trace = ramp(seconds=100, start_qps=2.0, end_qps=40.0)
    _, plans, mismatches, _ = replay_through_the_operator(scenario, trace)
    assert mismatches == []
    names = [v.name for v in scenario.spec.variants]
    assert any(p.entry() != names[0] for p in plans)
    assert any(p.router_share > 0 and p.row is not None for p in plans)
    assert len({(p.entry(), p.router_share, p.row) for p in plans}) > 2
    for plan in plans:
        view = router_view(plan, scenario.spec)
        assert view.entry == plan.entry()
        if plan.router_share > 0:
            # the heavy stage is the one the entry escalates to, and it has replicas
            if plan.row is not None:
                assert view.heavy == plan.row.heavy
            assert view.heavy is not None and plan.replicas()[view.heavy] > 0
            assert view.share == plan.router_share
