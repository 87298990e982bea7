"""Status conditions and the plan restored from status after a restart."""

from __future__ import annotations

from diffcascade_operator.control import fallback_plan
from diffcascade_operator.kube import status as st
from diffcascade_operator.kube.manifests import plan_id
from diffcascade_operator.kube.reconcile import step_status
from test_kube_manifests import _plan, _spec


def test_last_transition_time_moves_only_when_the_status_flips() -> None:
    first = st.merge_conditions(
        None, [st.Condition("Ready", "True", "Serving", "a")], now=100.0, generation=1
    )
    same = st.merge_conditions(
        first, [st.Condition("Ready", "True", "Serving", "b")], now=200.0, generation=2
    )
    flipped = st.merge_conditions(
        same, [st.Condition("Ready", "False", "StageUnavailable", "c")], now=300.0, generation=2
    )
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"] == st.iso(100.0)
    assert same[0]["message"] == "b" and same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == st.iso(300.0)


def test_conditions_keep_other_types_in_a_fixed_order() -> None:
    conds = st.merge_conditions(
        [{"type": "MetricsAvailable", "status": "True", "reason": "Prometheus"}],
        [st.Condition("Degraded", "False", "AsExpected"), st.Condition("Ready", "True", "Serving")],
        now=1.0,
        generation=None,
    )
    assert [c["type"] for c in conds] == ["Ready", "Degraded", "MetricsAvailable"]


def test_the_plan_written_to_status_is_the_plan_read_back() -> None:
    plan = _plan(2, 3, 0.05, batch=2)
    status = {
        "demand": {"qps": plan.demand_qps},
        "allocation": st.allocation_doc(plan, ready={"light": 1}, plan_id=plan_id(plan)),
    }
    restored = st.plan_from_status(status)
    assert restored is not None
    assert restored.variants == plan.variants
    assert restored.threshold == plan.threshold
    assert plan_id(restored) == plan_id(plan)
    assert st.plan_from_status({}) is None
    assert st.plan_from_status({"allocation": {"variants": [{"name": "x"}]}}) is None


def test_replicas_summary_reads_desired_over_ready() -> None:
    assert st.replicas_summary(_plan(2, 3, 0.1), {"light": 2}) == "light=2/2 heavy=3/0"


def test_a_hybrid_plan_shows_and_restores_its_entry_pair_router_share_and_row() -> None:
    import dataclasses

    from diffcascade_operator.profiles import QualityRow

    base = _plan(2, 3, 0.05, batch=2)
    light = dataclasses.replace(base.variants[0], next_stage="heavy")
    row = QualityRow("light", "heavy", 0.2, 0.5, 0.6, 19.29)
    plan = dataclasses.replace(
        base, variants=(light, base.variants[1]), router_share=0.2, row=row, entry_stage="light"
    )
    doc = st.allocation_doc(plan, ready={}, plan_id=plan_id(plan))
    assert (doc["entryStage"], doc["heavyStage"], doc["pair"]) == ("light", "heavy", "light->heavy")
    assert doc["routerShare"] == 0.2 and doc["row"]["fid"] == 19.29
    restored = st.plan_from_status({"allocation": doc})
    assert restored is not None
    assert (restored.entry(), restored.router_share, restored.row) == ("light", 0.2, row)
    # a plan serving one variant alone names no heavy stage
    alone = dataclasses.replace(
        base,
        variants=(dataclasses.replace(light, threshold=0.0, next_stage=None), base.variants[1]),
    )
    assert st.allocation_doc(alone, ready={}, plan_id="x")["pair"] == "light"
    # `diffcascade status` on a cluster reads the same fields
    from diffcascade_operator.local.cluster_status import render_cluster_status
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_cluster_status({"metadata": {"name": "c"}, "status": {"allocation": doc}}))
    text = console.export_text()
    assert (
        "light->heavy  (table row r=0.2 c=0.5: FID 19.29)  entry light, router share 0.20" in text
    )


def test_a_plan_decide_could_not_make_is_allocation_solved_false_and_degraded() -> None:
    plan = fallback_plan(_spec(), 10.0, "cannot plan: variant light: batch 1 takes 0 ms")
    fields = step_status(
        plan=plan,
        reading=None,
        metrics_error="no Prometheus",
        apply_error=None,
        result=None,
        ready={},
        status={},
        generation=1,
        now=10.0,
        history=[],
    )
    conditions = {c["type"]: c for c in fields["conditions"]}
    solved = conditions["AllocationSolved"]
    assert (solved["status"], solved["reason"]) == ("False", "CannotPlan")
    assert "batch 1 takes 0 ms" in solved["message"]
    assert fields["allocation"]["solver"]["status"] == "Failed"
