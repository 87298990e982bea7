"""The control plane runs without torch: it imports only the worker's torch-free contract."""

from __future__ import annotations

import json
import subprocess
import sys

#: The worker modules the operator may import: the HTTP contract, the deferral contract, the
#: deadline rule, the storage-URI rules, and the HTTP armour and client API keys the `up`
#: router shares with the workers (with the error envelope they answer in). Anything else of
#: the worker may pull torch in.
CONTRACT = {
    "diffcascade_worker",
    "diffcascade_worker.protocol",
    "diffcascade_worker.deferral",
    "diffcascade_worker.deadline",
    "diffcascade_worker.storage",
    "diffcascade_worker.storage.uris",
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
