"""The chaos suite reuses the operator's kmock bench (tests/operator/kube): its helpers are put
on the import path, and its session kubeconfig is set before anything imports `kubernetes`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator" / "kube"))

from kube_session import KUBECONFIG  # sets $KUBECONFIG

# isort: split
import kubernetes

kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(KUBECONFIG)
