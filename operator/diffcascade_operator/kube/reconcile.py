"""What the Kopf handlers do, as plain functions: apply children, run one control step.

The handlers only unpack Kopf's kwargs and call into here, so the whole loop can also be
driven directly (benchmarks do). Per-cascade memory (demand history, last plan, which pods
hold which plan) lives in a `CascadeState` kept in Kopf's per-object memo; after a restart it
is seeded from the status the previous operator wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import kopf

from diffcascade_operator import control
from diffcascade_operator.kube import curve_files, manifests, profiling
from diffcascade_operator.kube import status as st
from diffcascade_operator.kube.actuator import ApplyResult, PodInfo, apply_plan
from diffcascade_operator.kube.api import (
    API_ERRORS,
    ChildConflict,
    KubeApi,
    api_error_text,
    secret_token,
)
from diffcascade_operator.kube.policy import ForbiddenSpec, check_spec
from diffcascade_operator.kube.settings import OperatorSettings
from diffcascade_operator.live_profiles import (
    LiveProfileError,
    LiveProfileResult,
    LiveProfileSettings,
)
from diffcascade_operator.measured_slo import (
    MeasuredSlo,
    SloCache,
    SloSettings,
    read_slo,
    slo_summary,
    verdict,
)
from diffcascade_operator.metrics_source import (
    FallbackSource,
    MetricsReading,
    MetricsSource,
    PrometheusSource,
    ScrapeSource,
    live_source_for,
)
from diffcascade_operator.plan import Plan, SolverStatus
from diffcascade_operator.profiles import CascadeProfiles, ProfileError, profiles_from_spec
from diffcascade_operator.queueing import Dispatch
from diffcascade_operator.snapshot import DemandSample, Snapshot
from diffcascade_operator.snapshot_builder import (
    LiveCache,
    build_snapshot,
    read_live_profiles,
    read_metrics,
)
from diffcascade_operator.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    CascadeSpec,
    InvalidSpec,
    check_deployable,
    check_names,
    parse_spec,
)

logger = logging.getLogger(__name__)

Decide = Callable[[Snapshot, Plan | None], Plan]

#: (operator ms, decide ms) of the latest control steps in this process, for diagnostics and
#: benchmarks; bounded, so it costs nothing to keep.
RECENT_STEPS: deque[tuple[float, float]] = deque(maxlen=10_000)
Event = tuple[str, str, str]  # (type, reason, message)


@dataclass
class CascadeState:
    """In-memory state of one cascade's control loop."""

    history: deque[DemandSample]
    plan: Plan | None = None
    last_step: float = 0.0
    acknowledged: dict[str, str] = field(default_factory=dict)  # pod uid -> plan id
    token: str | None = None
    configmap_plan_id: str | None = None
    spec_hash: str | None = None
    spec: CascadeSpec | None = None
    profiles: CascadeProfiles | None = None
    source: MetricsSource | None = None
    source_url: str | None = None
    endpoints: dict[str, list[str]] = field(default_factory=dict)
    live_cache: LiveCache = field(default_factory=LiveCache)  # the last histogram read
    slo_cache: SloCache = field(default_factory=SloCache)  # the last measured-SLO read
    restored: bool = False
    profiling: profiling.ProfilingMemo = field(default_factory=profiling.ProfilingMemo)


def new_state(settings: OperatorSettings) -> CascadeState:
    return CascadeState(history=deque(maxlen=settings.demand_history))


def load_spec(
    state: CascadeState,
    raw: Mapping[str, Any],
    *,
    settings: OperatorSettings | None = None,
    cascade: str | None = None,
) -> tuple[CascadeSpec, CascadeProfiles]:
    """Parse, name-check (with `cascade`), policy-check (with `settings`) and profile the spec,
    once per distinct spec; InvalidSpec (ForbiddenSpec for the policy) says what is wrong."""
    digest = hashlib.sha256(
        json.dumps([cascade, raw], sort_keys=True, default=str).encode()
    ).hexdigest()
    if digest != state.spec_hash or state.spec is None or state.profiles is None:
        spec = parse_spec(dict(raw))
        check_deployable(spec)
        if cascade is not None:
            check_names(cascade, spec)
        if settings is not None:
            check_spec(spec, settings)
        try:
            profiles = profiles_from_spec(spec)
        except (ProfileError, OSError) as exc:
            raise InvalidSpec(f"profiles: {exc}") from None
        state.spec, state.profiles, state.spec_hash = spec, profiles, digest
        if state.plan is not None and [v.name for v in state.plan.variants] != [
            v.name for v in spec.variants
        ]:
            state.plan = None  # the variants changed: the old plan does not describe them
    return state.spec, state.profiles


def invalid_spec_status(
    error: InvalidSpec, *, status: Mapping[str, Any], now: float, generation: int | None
) -> dict[str, Any]:
    """Conditions for a spec that cannot be used; everything that runs is left alone."""
    reason = spec_error_reason(error)
    what = "not allowed by the operator's policy" if reason == "Forbidden" else "invalid"
    message = f"spec is {what}, nothing was changed: {error}"
    return refused_status(reason, message, status=status, now=now, generation=generation)


CONFLICT_REASON = "NameConflict"
#: AllocationSolved False and a Warning: decide() could not use its inputs (the plan is held).
CANNOT_PLAN = "CannotPlan"


def conflict_status(
    error: ChildConflict, *, status: Mapping[str, Any], now: float, generation: int | None
) -> dict[str, Any]:
    """Conditions for a cascade whose children's names are taken by objects it does not own."""
    return refused_status(
        CONFLICT_REASON, conflict_message(error), status=status, now=now, generation=generation
    )


def conflict_message(error: ChildConflict) -> str:
    return (
        f"{error}; nothing was changed: the operator modifies only objects this cascade "
        "controls. Rename the cascade or the variant, or remove those objects."
    )[:1000]


def conflict_events(error: ChildConflict, status: Mapping[str, Any]) -> list[Event]:
    """A Warning when the conflict is new (not on every control step)."""
    for cond in status.get("conditions") or ():
        if cond.get("type") == st.READY and cond.get("reason") == CONFLICT_REASON:
            return []
    return [("Warning", CONFLICT_REASON, conflict_message(error))]


def refused_status(
    reason: str, message: str, *, status: Mapping[str, Any], now: float, generation: int | None
) -> dict[str, Any]:
    """Ready False, Degraded True, Progressing False, all with `reason` and `message`."""
    return {
        "observedGeneration": generation,
        "conditions": st.merge_conditions(
            status.get("conditions"),
            [
                st.Condition(st.READY, "False", reason, message),
                st.Condition(st.DEGRADED, "True", reason, message),
                st.Condition(st.PROGRESSING, "False", reason, message),
            ],
            now=now,
            generation=generation,
        ),
    }


def spec_error_reason(error: InvalidSpec) -> str:
    """The condition and Event reason of an unusable spec."""
    return "Forbidden" if isinstance(error, ForbiddenSpec) else "InvalidSpec"


def starting_plan(
    state: CascadeState,
    *,
    spec: CascadeSpec,
    profiles: CascadeProfiles,
    status: Mapping[str, Any],
    now: float,
    dispatch: Dispatch = Dispatch.RANDOM,
) -> Plan:
    """The plan new children start from: the last one (memory, then status), else the initial."""
    if state.plan is None and not state.restored:
        state.restored = True
        restored = st.plan_from_status(status)
        if restored is not None and [v.name for v in restored.variants] == [
            v.name for v in spec.variants
        ]:
            state.plan = restored
        demand = status.get("demand") or {}
        at = st.parse_iso(demand.get("at"))
        if at is not None and demand.get("measuredQps") is not None and not state.history:
            state.history.append(DemandSample(at=at, qps=float(demand["measuredQps"])))
    if state.plan is not None:
        return state.plan
    return control.initial_plan(spec=spec, profiles=profiles, now=now, dispatch=dispatch)


def owner_ref(body: Mapping[str, Any]) -> dict[str, Any]:
    """The cascade as the owner its children name (what `kopf.adopt` writes)."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": meta.get("name"),
        "uid": meta.get("uid"),
    }


def ensure_children(
    *,
    api: KubeApi,
    owner: Mapping[str, Any],
    namespace: str,
    name: str,
    spec: CascadeSpec,
    plan: Plan,
    state: CascadeState,
    settings: OperatorSettings,
) -> dict[str, str]:
    """Create what is missing, patch what exists; returns {child: 'created'|'patched'}.

    Every child is read first: if any name is taken by an object this cascade does not
    control, ChildConflict is raised before anything is created or changed."""

    def build(token: str) -> list[manifests.Manifest]:
        children = manifests.children(
            cascade=name,
            namespace=namespace,
            spec=spec,
            plan=plan,
            replicas=plan.replicas(),
            token=token,
            settings=settings,
        )
        kopf.adopt(children, owner=owner)  # type: ignore[arg-type]
        return children

    existing = api.existing(build(state.token or ""))
    if state.token is None:
        secret = existing.get(f"Secret/{manifests.secret_name(name)}")
        state.token = secret_token(secret) or secrets.token_urlsafe(32)
    results = {
        key: api.apply(child, existing=existing.get(key))
        for child in build(state.token)
        for key in [f"{child['kind']}/{child['metadata']['name']}"]
    }
    state.configmap_plan_id = manifests.plan_id(plan)
    return results


def apply_children(
    *,
    api: KubeApi,
    body: Mapping[str, Any],
    state: CascadeState,
    settings: OperatorSettings,
    now: float | None = None,
) -> tuple[dict[str, Any], list[Event]]:
    """The create/update/resume reconcile: (status fields, events). Never raises InvalidSpec."""
    now = time.time() if now is None else now
    meta = body.get("metadata", {})
    name, namespace = meta["name"], meta["namespace"]
    generation = meta.get("generation")
    status = body.get("status") or {}
    measuring = profiling_gate(api=api, body=body, state=state, settings=settings, now=now)
    if measuring is not None and not measuring.done:
        waiting = profiling.waiting_status(measuring, status=status, now=now, generation=generation)
        return waiting, measuring.take_events()
    raw = measuring.raw if measuring is not None else body.get("spec") or {}
    try:
        raw = curve_files.resolve_curve_uris(raw, api=api, namespace=namespace)
        spec, profiles = load_spec(state, raw, settings=settings, cascade=name)
    except InvalidSpec as exc:
        return invalid_spec_status(exc, status=status, now=now, generation=generation), [
            ("Warning", spec_error_reason(exc), str(exc)[:1000])
        ]
    plan = starting_plan(
        state, spec=spec, profiles=profiles, status=status, now=now, dispatch=settings.dispatch
    )
    try:
        results = ensure_children(
            api=api,
            owner=body,
            namespace=namespace,
            name=name,
            spec=spec,
            plan=plan,
            state=state,
            settings=settings,
        )
    except ChildConflict as exc:
        return conflict_status(exc, status=status, now=now, generation=generation), (
            conflict_events(exc, status)
        )
    state.last_step = 0.0  # decide again on the next tick: the spec may have changed
    created = sorted(k for k, v in results.items() if v == "created")
    events: list[Event] = []
    if created:
        events.append(("Normal", "ChildrenCreated", "created " + ", ".join(created)))
    removed = api.prune(
        namespace, name, owner_uid=str(meta.get("uid")), keep={v.name for v in spec.variants}
    )
    if removed:
        events.append(
            ("Normal", "ChildrenRemoved", "variant gone from spec: " + ", ".join(removed))
        )
    fields: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": st.merge_conditions(
            status.get("conditions"),
            [st.Condition(st.PROGRESSING, "True", "ChildrenApplied", "workers rolled out")],
            now=now,
            generation=generation,
        ),
    }
    if st.condition_status(status.get("conditions"), st.READY) in (None, "False"):
        # Clear a stale InvalidSpec; the control step sets the real state on its next tick.
        fields["conditions"] = st.merge_conditions(
            fields["conditions"],
            [st.Condition(st.READY, "Unknown", "Reconciling", "waiting for the control loop")],
            now=now,
            generation=generation,
        )
    fields = profiling.with_profiling_status(fields, measuring, now=now, generation=generation)
    return fields, [*(measuring.take_events() if measuring is not None else []), *events]


def profiling_gate(
    *,
    api: KubeApi,
    body: Mapping[str, Any],
    state: CascadeState,
    settings: OperatorSettings,
    now: float,
) -> profiling.ProfilingOutcome | None:
    """Where `profile.auto` profiling stands (None: no variant asks for it); see kube.profiling."""

    def adopt(manifest: dict[str, Any], owner: Mapping[str, Any]) -> None:
        kopf.adopt(manifest, owner=owner)  # type: ignore[arg-type]

    return profiling.gate(
        api=api, body=body, memo=state.profiling, settings=settings, now=now, adopt=adopt
    )


def metrics_source(
    state: CascadeState, spec: CascadeSpec, settings: OperatorSettings
) -> MetricsSource | None:
    url = spec.control.prometheus_url or settings.prometheus_url
    interval = settings.interval_s or spec.control.interval_seconds
    prom_now = getattr(getattr(state.source, "primary", state.source), "demand_window_s", None)
    stale = prom_now is not None and prom_now != interval
    if state.source is None or state.source_url != url or stale:
        scrape = ScrapeSource(lambda: state.endpoints) if settings.scrape_fallback else None
        prom = (
            PrometheusSource(
                url,
                window_s=settings.metrics_window_s,
                namespace_label=settings.namespace_label,
                # the demand counts every arrival of the control interval (`demand.py`)
                demand_window_s=interval,
            )
            if url
            else None
        )
        source: MetricsSource | None
        if prom is not None and scrape is not None:
            source = FallbackSource(prom, scrape)
        else:
            source = prom or scrape
        state.source, state.source_url = source, url
    return state.source


@dataclass(frozen=True)
class StepOutcome:
    status: dict[str, Any]  # status fields as they should be (the caller diff-patches)
    events: list[Event]
    decide_ms: float
    operator_ms: float  # the step's own time, decide() excluded


def _plan_changed(plan: Plan, previous: Plan | None) -> bool:
    if previous is None:
        return True
    return not plan.same_allocation(previous) or round(plan.threshold, 4) != round(
        previous.threshold, 4
    )


def describe_change(plan: Plan, previous: Plan | None) -> str:
    parts = []
    if previous is None or round(previous.threshold, 4) != round(plan.threshold, 4):
        before = "-" if previous is None else f"{previous.threshold:.3f}"
        parts.append(f"threshold {before}->{plan.threshold:.3f}")
    old = previous.replicas() if previous is not None else {}
    old_batch = {a.name: a.batch_size for a in previous.variants} if previous else {}
    for a in plan.variants:
        if old.get(a.name) != a.replicas or old_batch.get(a.name) != a.batch_size:
            parts.append(
                f"{a.name} {old.get(a.name, '-')}->{a.replicas} replicas "
                f"(batch {old_batch.get(a.name, '-')}->{a.batch_size})"
            )
    return (
        f"{'; '.join(parts) or 'plan refreshed'} at {plan.demand_qps:.2f} qps "
        f"({plan.solver.status.value}): {plan.reason}"
    )


def control_step(
    *,
    api: KubeApi,
    body: Mapping[str, Any],
    state: CascadeState,
    pods: Sequence[PodInfo],
    deployment_replicas: Mapping[str, int | None],
    settings: OperatorSettings,
    now: float | None = None,
    decide: Decide = control.decide,
    force: bool = False,
) -> StepOutcome | None:
    """One control step if the interval has passed (None otherwise)."""
    started = time.perf_counter()
    now = time.time() if now is None else now
    meta = body.get("metadata", {})
    name, namespace = meta["name"], meta["namespace"]
    generation = meta.get("generation")
    status = body.get("status") or {}
    measuring = profiling_gate(api=api, body=body, state=state, settings=settings, now=now)
    if measuring is not None and not measuring.done:
        waiting = profiling.waiting_status(measuring, status=status, now=now, generation=generation)
        elapsed_ms = (time.perf_counter() - started) * 1000
        return StepOutcome(waiting, measuring.take_events(), 0.0, elapsed_ms)
    raw = measuring.raw if measuring is not None else body.get("spec") or {}
    try:
        raw = curve_files.resolve_curve_uris(raw, api=api, namespace=namespace)
        spec, profiles = load_spec(state, raw, settings=settings, cascade=name)
    except InvalidSpec as exc:
        fields = invalid_spec_status(exc, status=status, now=now, generation=generation)
        return StepOutcome(fields, [], 0.0, (time.perf_counter() - started) * 1000)
    interval = settings.interval_s or spec.control.interval_seconds
    due = control.step_due(state.plan, since_last_s=now - state.last_step, interval_s=interval)
    if not force and due is False:
        return None
    if due is not None or force:
        state.last_step = now  # an early step leaves the regular cadence where it was
    previous = starting_plan(
        state, spec=spec, profiles=profiles, status=status, now=now, dispatch=settings.dispatch
    )
    events: list[Event] = []
    apply_error: str | None = None
    router_missing = settings.router and manifests.ROUTER_INDEX_KEY not in deployment_replicas
    if router_missing or any(v.name not in deployment_replicas for v in spec.variants):
        try:
            results = ensure_children(
                api=api,
                owner=body,
                namespace=namespace,
                name=name,
                spec=spec,
                plan=previous,
                state=state,
                settings=settings,
            )
        except ChildConflict as exc:
            fields = conflict_status(exc, status=status, now=now, generation=generation)
            elapsed_ms = (time.perf_counter() - started) * 1000
            return StepOutcome(fields, conflict_events(exc, status), 0.0, elapsed_ms)
        except API_ERRORS as exc:
            # Decide anyway (the plan and the status say what the loop wants); apply nothing
            # until the children exist.
            apply_error = api_error_text(exc)
            logger.warning("[%s/%s] creating children failed: %s", namespace, name, apply_error)
        else:
            created = sorted(k for k, v in results.items() if v == "created")
            if created:
                events.append(("Normal", "ChildrenCreated", "re-created " + ", ".join(created)))
            deployment_replicas = {**{v.name: None for v in spec.variants}, **deployment_replicas}
    if state.token is None and apply_error is None:
        try:
            state.token = api.read_token(
                namespace, manifests.secret_name(name), owner=owner_ref(body)
            )
        except API_ERRORS as exc:
            logger.warning("[%s/%s] reading the token: %s", namespace, name, api_error_text(exc))

    mine = [p for p in pods if not p.deleting]
    state.endpoints = {
        v.name: [p.url for p in mine if p.variant == v.name and p.serving and p.url]
        for v in spec.variants
    }
    ready = {v.name: len(state.endpoints[v.name]) for v in spec.variants}
    variants = [v.name for v in spec.variants]
    reading: MetricsReading | None = None
    note: str | None = "no Prometheus URL configured and direct scraping is off"
    source = metrics_source(state, spec, settings)
    if source is not None:
        reading, note = read_metrics(source, cascade=name, variants=variants, namespace=namespace)
    metrics_error = note if reading is None else None
    fallback_reason = note if reading is not None else None
    live, live_note = live_step(
        source,
        reading,
        profiles=profiles,
        cascade=name,
        namespace=namespace,
        plan=previous,
        variants=variants,
        settings=settings,
        cache=state.live_cache,
        now=now,
    )
    events.extend(drift_events(live, live_note, status=status))
    measured, slo_note = read_slo(
        live_source_for(source, reading),
        cascade=name,
        variants=variants,
        slo_s=spec.slo_seconds,
        settings=slo_settings(settings),
        namespace=namespace,
        cache=state.slo_cache,
        now=now,
    )
    snapshot = build_snapshot(
        spec=spec,
        profiles=live.profiles,
        now=now,
        history=state.history,
        reading=reading,
        ready_replicas=ready,
        dispatch=settings.dispatch,
        entry=state.plan.entry() if state.plan is not None else None,
    )
    decide_started = time.perf_counter()
    plan = decide(snapshot, state.plan)  # None until a plan was decided or restored
    decide_ms = (time.perf_counter() - decide_started) * 1000

    result: ApplyResult | None = None
    if apply_error is None:  # (with children missing there is nothing to apply to)
        try:
            result = apply_plan(
                api=api,
                namespace=namespace,
                cascade=name,
                spec=spec,
                plan=plan,
                current_replicas=deployment_replicas,
                pods=mine,
                token=state.token,
                acknowledged=state.acknowledged,
                configmap_plan_id=state.configmap_plan_id,
                timeout_s=settings.push_timeout_s,
                port=settings.worker_port,
                router=manifests.router_document(
                    cascade=name, namespace=namespace, plan=plan, spec=spec, settings=settings
                ),
            )
            state.configmap_plan_id = manifests.plan_id(plan)
        except API_ERRORS as exc:
            apply_error = api_error_text(exc)
            logger.warning("[%s/%s] applying the plan failed: %s", namespace, name, apply_error)

    held = plan.solver.status in (SolverStatus.HELD, SolverStatus.FAILED)
    if _plan_changed(plan, state.plan) and (not held or state.plan is None):
        events.append(("Normal", "PlanChanged", describe_change(plan, state.plan)))
    if plan.solver.status is SolverStatus.FAILED and not any(
        c.get("type") == st.ALLOCATION_SOLVED and c.get("reason") == CANNOT_PLAN
        for c in status.get("conditions") or ()
    ):
        events.append(("Warning", CANNOT_PLAN, plan.solver.message[:1000]))
    if (
        metrics_error is not None
        and st.condition_status(status.get("conditions"), st.METRICS_AVAILABLE) != "False"
    ):
        events.append(("Warning", "MetricsUnavailable", metrics_error[:1000]))
    state.plan = plan

    fields = step_status(
        plan=plan,
        reading=reading,
        metrics_error=metrics_error,
        fallback_reason=fallback_reason,
        apply_error=apply_error,
        result=result,
        ready=ready,
        status=status,
        generation=generation,
        now=now,
        history=state.history,
        live=live,
        live_note=live_note,
        slo=MeasuredSloStep(measured, slo_note, slo_settings(settings), spec.slo_seconds),
    )
    events.extend(slo_events(fields, status=status))
    fields = profiling.with_profiling_status(fields, measuring, now=now, generation=generation)
    if measuring is not None:
        events[:0] = measuring.take_events()
    operator_ms = (time.perf_counter() - started) * 1000 - decide_ms
    RECENT_STEPS.append((operator_ms, decide_ms))
    return StepOutcome(fields, events, decide_ms, operator_ms)


@dataclass(frozen=True)
class MeasuredSloStep:
    """One step's SLO measurement (None: none, `note` says why) and how it is judged."""

    measured: MeasuredSlo | None
    note: str | None
    settings: SloSettings
    slo_s: float


def slo_settings(settings: OperatorSettings) -> SloSettings:
    """The operator's SLO-measurement settings; the defaults (and a warning) when unusable."""
    try:
        return SloSettings(
            window_s=settings.slo_window_s,
            tolerance=settings.slo_tolerance,
            min_requests=settings.slo_min_requests,
        )
    except ValueError as exc:
        logger.warning("DIFFCASCADE_SLO_* settings ignored: %s", exc)
        return SloSettings()


def slo_events(fields: Mapping[str, Any], *, status: Mapping[str, Any]) -> list[Event]:
    """A warning Event when SLOMet turns False, and one when it turns back to True."""
    before = st.condition_status(status.get("conditions"), st.SLO_MET)
    after = next((c for c in fields.get("conditions") or () if c["type"] == st.SLO_MET), None)
    if after is None:
        return []
    if after["status"] == "False" and before != "False":
        return [("Warning", "SLOMissed", str(after["message"])[:1000])]
    if after["status"] == "True" and before == "False":
        return [("Normal", "SLOMet", str(after["message"])[:1000])]
    return []


def write_status(api: KubeApi, body: Mapping[str, Any], fields: Mapping[str, Any]) -> str | None:
    """Patch the status fields that differ from the status last seen; returns what the
    apiserver said when it did not take the patch (the next step writes them again).

    The operator writes the control loop's status itself instead of leaving it to Kopf: Kopf
    stops a timer for good when the patch it makes on the handler's behalf fails (a 409, or
    any error that outlasts its retries)."""
    patch = st.diff_patch(body.get("status") or {}, fields)
    if not patch:
        return None
    meta = body.get("metadata", {})
    try:
        api.patch_status(meta["namespace"], meta["name"], patch)
    except API_ERRORS as exc:
        error = api_error_text(exc)
        logger.warning(
            "[%s/%s] writing the status failed: %s", meta["namespace"], meta["name"], error
        )
        return error
    return None


def live_settings(settings: OperatorSettings) -> LiveProfileSettings:
    """The operator's live-profile settings; the defaults (and a warning) when they are unusable."""
    try:
        return LiveProfileSettings(
            window_s=settings.live_window_s,
            min_samples=settings.live_min_samples,
            min_batches=settings.live_min_batches,
            drift_distance=settings.drift_distance,
            drift_min_samples=settings.drift_min_samples,
        )
    except LiveProfileError as exc:
        logger.warning("DIFFCASCADE_LIVE_*/DRIFT_* settings ignored: %s", exc)
        return LiveProfileSettings()


def live_step(
    source: MetricsSource | None,
    reading: MetricsReading | None,
    *,
    profiles: CascadeProfiles,
    cascade: str,
    namespace: str,
    variants: Sequence[str],
    plan: Plan | None,
    settings: OperatorSettings,
    cache: LiveCache | None = None,
    now: float = 0.0,
) -> tuple[LiveProfileResult, str | None]:
    """The live profiles to plan with; histograms are read from the source that just answered
    (no second wait on a Prometheus that is down), none when no source did."""
    return read_live_profiles(
        live_source_for(source, reading),
        profiles=profiles,
        cascade=cascade,
        variants=variants,
        plan=plan,
        settings=live_settings(settings),
        namespace=namespace,
        cache=cache,
        now=now,
    )


def drift_events(
    live: LiveProfileResult, note: str | None, *, status: Mapping[str, Any]
) -> list[Event]:
    """An Event when ProfileDrift turns True, and one when it turns back to False."""
    before = st.condition_status(status.get("conditions"), st.PROFILE_DRIFT)
    cond = st.profile_drift_condition(live, note=note)
    if cond.status == "True" and before != "True":
        return [("Warning", "ProfileDrift", cond.message[:1000])]
    if cond.status == "False" and before == "True":
        return [("Normal", "ProfileRecovered", cond.message[:1000])]
    return []


def step_status(
    *,
    plan: Plan,
    reading: MetricsReading | None,
    metrics_error: str | None,
    apply_error: str | None,
    fallback_reason: str | None = None,
    result: ApplyResult | None,
    ready: Mapping[str, int],
    status: Mapping[str, Any],
    generation: int | None,
    now: float,
    history: Sequence[DemandSample],
    live: LiveProfileResult | None = None,
    live_note: str | None = None,
    slo: MeasuredSloStep | None = None,
) -> dict[str, Any]:
    conds: list[st.Condition] = []
    if live is not None:
        conds.append(st.profile_drift_condition(live, note=live_note))
    judged = None
    if slo is not None:
        judged = verdict(slo.measured, plan=plan, settings=slo.settings, note=slo.note)
        conds.append(st.slo_condition(judged))
    if reading is not None:
        message = f"{reading.demand_qps:.2f} qps"
        if fallback_reason:
            message += f"; Prometheus did not answer: {fallback_reason}"
        conds.append(st.Condition(st.METRICS_AVAILABLE, "True", reading.source, message[:1000]))
    else:
        conds.append(
            st.Condition(
                st.METRICS_AVAILABLE,
                "False",
                "MetricsUnavailable",
                f"keeping the last plan: {metrics_error}"[:1000],
            )
        )
    solver = plan.solver
    if solver.status in (SolverStatus.OPTIMAL, SolverStatus.INITIAL):
        conds.append(
            st.Condition(st.ALLOCATION_SOLVED, "True", solver.status.value, plan.reason[:1000])
        )
    elif solver.status is SolverStatus.INFEASIBLE:
        conds.append(
            st.Condition(
                st.ALLOCATION_SOLVED,
                "False",
                "Infeasible",
                (solver.message or plan.reason)[:1000],
            )
        )
    elif solver.status is SolverStatus.FAILED:
        conds.append(
            st.Condition(st.ALLOCATION_SOLVED, "False", CANNOT_PLAN, solver.message[:1000])
        )
    elif st.condition_status(status.get("conditions"), st.ALLOCATION_SOLVED) is None:
        conds.append(st.Condition(st.ALLOCATION_SOLVED, "Unknown", "Held", plan.reason[:1000]))

    serving = result.serving if result is not None else 0
    acked = result.acknowledged if result is not None else 0
    if result is None:
        conds.append(
            st.Condition(st.THRESHOLD_APPLIED, "Unknown", "ApplyFailed", apply_error or "")
        )
    elif serving == 0:
        conds.append(
            st.Condition(st.THRESHOLD_APPLIED, "Unknown", "NoReadyWorkers", "no ready pod to tell")
        )
    elif acked == serving:
        conds.append(
            st.Condition(
                st.THRESHOLD_APPLIED,
                "True",
                "AllWorkersUpdated",
                f"threshold {plan.threshold:.3f} on {acked}/{serving} ready pods",
            )
        )
    else:
        failures = "; ".join(result.push_failures[:3])
        conds.append(
            st.Condition(
                st.THRESHOLD_APPLIED,
                "False",
                "PushFailed",
                f"{acked}/{serving} ready pods hold the plan; {failures}"[:1000],
            )
        )

    desired = plan.replicas()
    lagging = [a.name for a in plan.variants if ready.get(a.name, 0) != a.replicas]
    if lagging:
        conds.append(
            st.Condition(
                st.PROGRESSING,
                "True",
                "Scaling",
                ", ".join(f"{v} {ready.get(v, 0)}/{desired[v]} ready" for v in lagging),
            )
        )
    else:
        conds.append(st.Condition(st.PROGRESSING, "False", "Stable", "all replicas ready"))

    problems: list[tuple[str, str]] = []
    if apply_error:
        problems.append(("ApplyFailed", apply_error))
    if reading is None:
        problems.append(("MetricsUnavailable", metrics_error or ""))
    if solver.status is SolverStatus.INFEASIBLE:
        problems.append(("Infeasible", solver.message or plan.reason))
    if solver.status is SolverStatus.FAILED:
        problems.append((CANNOT_PLAN, solver.message))
    if result is not None and result.push_failures:
        problems.append(("PushFailed", "; ".join(result.push_failures[:3])))
    if judged is not None and judged.status == "False":
        problems.append(("SLOMissed", judged.message))
    if problems:
        conds.append(st.Condition(st.DEGRADED, "True", problems[0][0], problems[0][1][:1000]))
    else:
        conds.append(st.Condition(st.DEGRADED, "False", "AsExpected", ""))

    missing = [a.name for a in plan.variants if a.replicas > 0 and ready.get(a.name, 0) == 0]
    if apply_error:
        conds.append(st.Condition(st.READY, "False", "ApplyFailed", apply_error))
    elif missing:
        conds.append(
            st.Condition(
                st.READY, "False", "StageUnavailable", f"no ready pod: {', '.join(missing)}"
            )
        )
    else:
        conds.append(st.Condition(st.READY, "True", "Serving", "every stage has a ready pod"))

    total = sum(desired.values())
    total_ready = sum(ready.get(a.name, 0) for a in plan.variants)
    plan_id = manifests.plan_id(plan)
    last = history[-1] if history else None
    demand: dict[str, Any] = {
        "qps": round(plan.demand_qps, 3),
        "source": reading.source if reading is not None else "None",
    }
    if last is not None:
        demand["measuredQps"] = round(last.qps, 3)
        demand["at"] = st.iso(last.at)
    extra: dict[str, Any] = {"profiles": st.profiles_doc(live)} if live is not None else {}
    if slo is not None:
        extra["slo"] = slo_summary(
            slo.measured, plan=plan, slo_s=slo.slo_s, settings=slo.settings, note=slo.note
        )
    return {
        **extra,
        "observedGeneration": generation,
        "demand": demand,
        "allocation": st.allocation_doc(plan, ready=ready, plan_id=plan_id),
        "replicasSummary": st.replicas_summary(plan, ready),
        "readySummary": f"{total_ready}/{total}",
        "replicas": total,
        "readyReplicas": total_ready,
        "appliedWorkers": acked,
        "conditions": st.merge_conditions(
            status.get("conditions"), conds, now=now, generation=generation
        ),
    }
