"""The kubeconfig every kmock-based test writes and reads: one path per test session.

Imported first by each conftest that starts kmock (tests/operator/kube, tests/reliability), so
$KUBECONFIG is set before anything imports `kubernetes` (its config reads it at import time)
and both agree on it when a session runs them together.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

KUBE_DIR = Path(tempfile.mkdtemp(prefix="dc-kube-"))
KUBECONFIG = KUBE_DIR / "kubeconfig"
os.environ["KUBECONFIG"] = str(KUBECONFIG)
