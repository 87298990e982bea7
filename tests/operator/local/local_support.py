"""Cascade documents for the local-mode tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def cascade_doc(models: dict[str, Path], *, name: str = "e2e") -> dict[str, Any]:
    """Two stages; heavy profiled slow (600 ms) so ~8 qps needs a second heavy replica and a
    lower threshold, whatever the real (faster) tiny workers do."""
    light, heavy = models["light"], models["heavy"]
    return {
        "apiVersion": "diffcascade.dev/v1alpha1",
        "kind": "DiffusionCascade",
        "metadata": {"name": name},
        "spec": {
            "sloSeconds": 3,
            "gpuBudget": 3,
            "variants": [
                {
                    "name": "light",
                    "model": str(light),
                    "steps": 1,
                    "resolution": 64,
                    "minReplicas": 1,
                    "maxReplicas": 1,
                    "maxBatchSize": 4,
                    "profile": {"batchLatencyMs": {"1": 60, "2": 90, "4": 150}},
                    "gate": {
                        "discriminator": {"uri": str(light / "gate.pt")},
                        "deferCurve": {"path": str(light / "defer_curve.json")},
                    },
                },
                {
                    "name": "heavy",
                    "model": str(heavy),
                    "steps": 8,
                    "guidanceScale": 7.5,
                    "resolution": 64,
                    "minReplicas": 1,
                    "maxReplicas": 2,
                    "maxBatchSize": 2,
                    "profile": {"batchLatencyMs": {"1": 600, "2": 1000}},
                },
            ],
            "quality": {
                "fidByLightShare": [
                    {"lightShare": 0.0, "fid": 18.55},
                    {"lightShare": 0.4, "fid": 16.79},
                    {"lightShare": 1.0, "fid": 22.77},
                ]
            },
            "control": {"intervalSeconds": 1, "scaleDownStabilizationSeconds": 60},
        },
    }
