"""The local actuator keeps asking ready workers for /readyz, as a kubelet does: a worker that
stops answering leaves the router and comes back when it answers again."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from diffcascade_operator.local.actuator import UNREADY_AFTER_FAILURES, LocalActuator
from diffcascade_operator.local.router import Router
from diffcascade_operator.local.supervisor import (
    Supervisor,
    Worker,
    WorkerState,
    free_port,
    spawn,
    stop_processes,
)
from diffcascade_operator.plan import Plan, SolverOutcome, SolverStatus, VariantAllocation
from diffcascade_operator.spec import load_manifest
from local_support import cascade_doc

#: A stand-in worker process: 200 on /readyz and on config pushes, nothing else.
_STAND_IN = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def _ok(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
    def do_GET(self):
        self._ok()
    def do_PUT(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._ok()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.fixture
async def actuator(tmp_path: Path) -> AsyncIterator[LocalActuator]:
    _, spec = load_manifest(cascade_doc({"light": tmp_path / "l", "heavy": tmp_path / "h"}))
    router = Router(variants=["light", "heavy"], plan=dict)
    await router.start()
    supervisor = Supervisor(cascade="e2e", log_dir=tmp_path, token="t")
    actuator = LocalActuator(
        spec=spec, supervisor=supervisor, router=router, token="t", base_dir=tmp_path
    )
    try:
        yield actuator
    finally:
        stop_processes([w.process for w in supervisor.workers], grace_s=1.0)
        await actuator.aclose()
        await router.stop()


def _stand_in(actuator: LocalActuator, tmp_path: Path) -> Worker:
    port = free_port()
    process = spawn([sys.executable, "-c", _STAND_IN, str(port)], log_path=tmp_path / "w.log")
    worker = Worker(
        variant="light",
        serial=1,
        host="127.0.0.1",
        port=port,
        process=process,
        log_path=tmp_path / "w.log",
        started_at=time.monotonic(),
    )
    actuator.supervisor.workers.append(worker)
    return worker


async def _reconcile_until(actuator: LocalActuator, worker: Worker, state: WorkerState) -> int:
    """Reconcile passes (each probes every worker once) until `worker` is in `state`."""
    for passes in range(1, 40):
        await actuator.reconcile()
        if worker.state is state:
            return passes
        await asyncio.sleep(0.1)
    raise AssertionError(f"{worker.name} stayed {worker.state}")


async def test_a_ready_worker_that_stops_answering_leaves_the_router_and_comes_back(
    actuator: LocalActuator, tmp_path: Path
) -> None:
    worker = _stand_in(actuator, tmp_path)
    pool = actuator.router.pools["light"]
    await _reconcile_until(actuator, worker, WorkerState.READY)
    assert pool.urls() == [worker.url]

    os.kill(worker.process.pid, signal.SIGSTOP)  # hung: it neither answers nor dies
    try:
        passes = await _reconcile_until(actuator, worker, WorkerState.UNREADY)
        assert passes == UNREADY_AFTER_FAILURES
        assert pool.urls() == []  # new requests get an immediate 503, not a 25-s wait
        assert actuator.supervisor.of("light") == [worker]  # still counted: not relaunched
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
    await _reconcile_until(actuator, worker, WorkerState.READY)
    assert pool.urls() == [worker.url]


async def test_a_hung_worker_leaves_the_router_while_a_config_push_to_it_is_still_waiting(
    actuator: LocalActuator, tmp_path: Path
) -> None:
    worker = _stand_in(actuator, tmp_path)
    await _reconcile_until(actuator, worker, WorkerState.READY)

    os.kill(worker.process.pid, signal.SIGSTOP)
    try:
        # A new plan: its push to the hung worker holds the actuator for the whole push timeout.
        pushing = asyncio.create_task(actuator.apply(_plan(threshold=0.3)))
        await asyncio.sleep(0.2)
        assert not pushing.done()
        started = time.monotonic()
        await asyncio.wait_for(_reconcile_until(actuator, worker, WorkerState.UNREADY), 4.0)
        assert time.monotonic() - started < 4.0
        assert actuator.router.pools["light"].urls() == []
        assert not pushing.done()  # it left the router before the push gave up
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
    await pushing
    await _reconcile_until(actuator, worker, WorkerState.READY)
    assert worker.pushed == actuator.desired_config("light")  # back with the new plan's config


def _plan(*, threshold: float) -> Plan:
    return Plan(
        variants=(
            VariantAllocation("light", 1, 1, threshold),
            VariantAllocation("heavy", 0, 1, None),
        ),
        threshold=threshold,
        defer_fraction=0.5,
        demand_qps=1.0,
        predicted_latency_s=1.0,
        predicted_throughput_qps=2.0,
        predicted_fid=17.0,
        solver=SolverOutcome(SolverStatus.OPTIMAL, 1.0),
        reason="test",
        decided_at=0.0,
    )
