"""The control plane runs without torch: it imports only the worker's torch-free contract."""

from __future__ import annotations

import json
import subprocess
import sys

#: The worker modules the operator may import: the HTTP contract, the deferral contract, the
#: deadline rule, the storage-URI rules (and which files a pipeline loads), the pipeline
#: assembly fields, the router's rule and scorers (the simulator routes with them) and its
#: metric series (`up`'s entry URL exports them).
#: Anything else of the worker may pull torch in.
#: Also the HTTP armour and client API keys the routers share with the workers (with the
#: error envelope they answer in).
ROUTING = {
    "diffcascade_worker.routing",
    "diffcascade_worker.routing.rule",
    "diffcascade_worker.routing.features",
    "diffcascade_worker.routing.hadis_features",
    "diffcascade_worker.routing.learner",
    "diffcascade_worker.routing.scorers",
    "diffcascade_worker.routing.router",
    "diffcascade_worker.routing.labels",
    "diffcascade_worker.routing.metrics",
}
CONTRACT = {
    *ROUTING,
    "diffcascade_worker",
    "diffcascade_worker.protocol",
    "diffcascade_worker.deferral",
    "diffcascade_worker.deadline",
    "diffcascade_worker.storage",
    "diffcascade_worker.storage.uris",
    "diffcascade_worker.storage.pipeline_files",
    "diffcascade_worker.models",
    "diffcascade_worker.models.assembly",
    "diffcascade_worker.serving",
    "diffcascade_worker.serving.limits",
    "diffcascade_worker.serving.api_keys",
    "diffcascade_worker.serving.errors",
}


def test_operator_entry_points_import_neither_torch_nor_the_workers_model_code() -> None:
    script = (
        "import json, sys\n"
        "import diffcascade_operator.cli, diffcascade_operator.kube.handlers\n"
        "import diffcascade_operator.sim.run, diffcascade_operator.local.cascade\n"
        "mods = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'diffusers', 'transformers', 'diffcascade_worker'))\n"
        "print(json.dumps(mods))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert loaded <= CONTRACT, sorted(loaded - CONTRACT)


def test_the_router_service_runs_without_torch() -> None:
    """The operator image (no torch) runs `diffcascade-worker route` for every cascade."""
    script = (
        "import json, sys\n"
        "import diffcascade_worker.cli, diffcascade_worker.routing.route_command\n"
        "import diffcascade_worker.routing.app\n"
        f"import {', '.join(sorted(ROUTING))}\n"
        "mods = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'diffusers', 'transformers'))\n"
        "print(json.dumps(mods))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
