"""What `up` shows while it runs and what `status` prints: both render the state document.

On a terminal a rich live panel redraws every tick; elsewhere (a pipe, CI, a log file) one
plain line is printed per plan change, so logs stay readable.
"""

from __future__ import annotations

import re
import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from diffcascade_operator.local.cluster_status import (
    profiles_lines,
    slo_line,
    slo_verdict,
    source_text,
)

#: Off a terminal lines are never wrapped; this only bounds tables laid out to a width.
UNWRAPPED_WIDTH = 400


def make_console(*, stderr: bool = False) -> Console:
    """A console that wraps at the terminal's width on a terminal, and off one (a pipe, CI, a
    log file) never splits a line: rich would otherwise wrap at 80 columns, mid-word."""
    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, soft_wrap=True, width=UNWRAPPED_WIDTH)


def _num(value: Any, fmt: str = ".2f", missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def render_state(state: dict[str, Any]) -> RenderableType:
    """A panel of demand, plan, replicas and queues for one cascade."""
    plan = state.get("plan") or {}
    metrics = state.get("metrics") or {}
    solver = plan.get("solver") or {}
    running = "running" if state.get("running") else "stopped"
    head = Text.assemble(
        ("diffcascade ", "bold"),
        (str(state.get("cascade")), "bold cyan"),
        f"  {running}  {state.get('entry_url', '')}",
    )
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="dim")
    summary.add_column()
    summary.add_row(
        "demand",
        f"{demand_text(plan.get('demand_qps'), metrics.get('demand_qps'))}"
        f"  ({source_text(metrics.get('source'))})",
    )
    summary.add_row("pair", pair_text(plan))
    summary.add_row(
        "threshold",
        f"{_num(plan.get('threshold'), '.3f')}  defer {_num(plan.get('defer_fraction'), '.0%')}"
        f"  predicted FID {_num(plan.get('predicted_fid'))}"
        f"  latency {_num(plan.get('predicted_latency_s'))} s",
    )
    summary.add_row(
        "solver", f"{solver.get('status', '-')} in {_num(solver.get('solve_ms'), '.0f')} ms"
    )
    solved = re.compile(r"\w+, \d+ ms$")  # the solver row says it
    notes = [p for p in reason_tail(plan.get("reason")).split("; ") if not solved.fullmatch(p)]
    notes = [n for n in notes if n and n != "-"]
    if notes:  # nothing beyond the numbers above: no row (not `reason -`)
        summary.add_row("reason", "; ".join(notes))
    slo = slo_line(state.get("slo"))
    if slo is not None:
        summary.add_row("SLO", Text(slo, style="red" if slo.startswith("MISSED") else ""))
    for line in profiles_lines(state.get("profiles")):
        summary.add_row("profiles", line)
    if metrics.get("error"):
        summary.add_row("metrics", Text(str(metrics["error"])[:160], style="yellow"))
    table = Table(show_edge=False, header_style="bold")
    for column in ("variant", "ready/desired", "starting", "draining", "batch", "queue", "qps"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    batches = {v.get("name"): v.get("batch_size") for v in plan.get("variants") or []}
    for variant, info in (state.get("replicas") or {}).items():
        table.add_row(
            variant,
            f"{info.get('ready', 0)}/{_num(info.get('desired'), 'd')}",
            str(info.get("starting", 0)),
            str(info.get("draining", 0)),
            _num(batches.get(variant), "d"),
            _num(info.get("queue_depth"), ".0f"),
            _num(info.get("arrival_qps")),
        )
    return Group(head, summary, table)


def demand_text(planned: Any, measured: Any) -> str:
    """`planned 13.8 qps (measured 8.4)`: the plan is sized for the projection, not the rate."""
    return f"planned {_num(planned, '.1f')} qps (measured {_num(measured, '.1f')})"


def pair_text(plan: dict[str, Any]) -> str:
    """`entry -> heavy, router share r (row r, c: FID)` of a plan as `plan_to_dict` writes it."""
    variants = plan.get("variants") or []
    if not variants:
        return "-"
    entry = plan.get("entry_stage") or variants[0].get("name")
    chosen: dict[str, Any] = next((v for v in variants if v.get("name") == entry), {})
    heavy = chosen.get("next_stage")
    text = f"{entry} -> {heavy}" if heavy else f"{entry} alone"
    text += f", router share {_num(plan.get('router_share') or 0.0)}"
    row = plan.get("row")
    if isinstance(row, dict):
        text += (
            f" (table row r={row.get('router_share')} c={row.get('escalate_share')}: "
            f"FID {row.get('fid')})"
        )
    return text


#: The part of a plan's reason that repeats its numbers:
#: `[demand 8.1 qps → ][light→heavy r=0.2 ]t=0.1 f=0.4 ...`.
_SUMMARY = re.compile(r"(demand \S+ qps.*?→ )?(\S+ r=\S+ )?t=\S+ f=\S+ ")


def reason_tail(reason: Any) -> str:
    """A plan's reason without the summary whose numbers the line already shows."""
    parts = [p for p in str(reason or "-").split("; ") if not _SUMMARY.match(p)]
    tail = "; ".join(parts) or "-"
    return re.sub(r"solved (\w+) in (\d+) ms$", r"\1, \2 ms", tail)


def plan_line(state: dict[str, Any]) -> str:
    """One line about the current plan (for logs and pipes); each number once."""
    plan = state.get("plan") or {}
    metrics = state.get("metrics") or {}
    replicas = " ".join(
        f"{name}={info.get('ready', 0)}/{_num(info.get('desired'), 'd')}"
        for name, info in (state.get("replicas") or {}).items()
    )
    demand = demand_text(plan.get("demand_qps"), metrics.get("demand_qps"))
    hybrid = f"{pair_text(plan)}; " if plan.get("entry_stage") or plan.get("router_share") else ""
    return (
        f"{time.strftime('%H:%M:%S')} {demand}: {hybrid}t={_num(plan.get('threshold'), '.3f')} "
        f"defer {_num(plan.get('defer_fraction'), '.0%')} {replicas} "
        f"FID {_num(plan.get('predicted_fid'), '.1f')}; {reason_tail(plan.get('reason'))}"
        f"{measured_text(state.get('slo'))}"
    )


def measured_text(slo: dict[str, Any] | None) -> str:
    """`; measured: 79.5% of 1800 missed the 3 s SLO (p99 9.90 s), plan promised 0%`."""
    if not slo or slo.get("violationRatio") is None:
        return ""
    verdict = slo_verdict(slo)
    promised = slo.get("promisedViolationRatio")
    promise = "nothing (best effort)" if promised is None else f"{promised:.0%}"
    return (
        f"; measured: {slo['violationRatio']:.1%} of {slo.get('requests', 0)} missed the "
        f"{slo.get('sloSeconds', 0):g} s SLO (p99 {_num(slo.get('p99Seconds'))} s), plan "
        f"promised {promise}: {verdict}"
    )


class LiveView:
    """Redraws on every tick on a terminal; prints a line per plan change otherwise."""

    def __init__(self, console: Console, *, live: bool | None = None) -> None:
        self.console = console
        self.live_enabled = console.is_terminal if live is None else live
        self._live: Live | None = None

    def start(self) -> None:
        if self.live_enabled and self._live is None:
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.start()

    def update(self, state: dict[str, Any], changed: bool) -> None:
        if self._live is not None:
            self._live.update(render_state(state), refresh=True)
        elif changed:
            self.console.print(plan_line(state), highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
