"""`profile.auto` under Kopf (KopfRunner) and kmock: Job, ConfigMap, plan, re-profiling, failure.

The emulator runs no controllers and no pods, so the test plays the Job's part: it runs the
Job's own container arguments as a local `diffcascade-worker profile` process on the tiny
model (writing the termination message to a file instead of /dev/termination-log), then
creates the Pod object the Job controller and kubelet would, with that message in its
terminated container state, and marks the Job Complete.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kmock_k8s import ThreadedKMock
from kube_env import GROUP, VERSION, Cluster, operator_env, wait_for
from test_kube_operator import Operator

pytestmark = [pytest.mark.slow]

CASCADE = "tiny"
PROFILE_KEY = "diffcascade.dev/profile-key"


def _manifest(models: dict[str, Path], *, steps: int = 1) -> dict[str, Any]:
    light, heavy = models["light"], models["heavy"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DiffusionCascade",
        "metadata": {"name": CASCADE},
        "spec": {
            "sloSeconds": 5,
            "gpuBudget": 3,
            "variants": [
                {
                    "name": "light",
                    "model": str(light),
                    "steps": steps,
                    "resolution": 64,
                    "maxBatchSize": 4,
                    # No table and no curve: only the profiling Job can give them.
                    "profile": {"auto": True, "batchSizes": [1, 2, 4]},
                    "gate": {"discriminator": {"uri": str(light / "gate.pt")}},
                    "minReplicas": 1,
                },
                {
                    "name": "heavy",
                    "model": str(heavy),
                    "steps": 2,
                    "resolution": 64,
                    "profile": {"batchLatencyMs": {"1": 1000, "2": 1600}},
                    "minReplicas": 1,
                },
            ],
            "quality": {"reference": "c1"},
            "control": {"intervalSeconds": 1.0},
        },
    }


def _jobs(namespace: str) -> list[dict[str, Any]]:
    batch = kubernetes.client.BatchV1Api()
    api = kubernetes.client.ApiClient()
    return [api.sanitize_for_serialization(j) for j in batch.list_namespaced_job(namespace).items]


def _deployments(cluster: Cluster, namespace: str) -> list[str]:
    return [d.metadata.name for d in cluster.apps.list_namespaced_deployment(namespace).items]


def _play_the_job(namespace: str, job: dict[str, Any], tmp_path: Path, *, fail: str = "") -> None:
    """Run the Job's container (its real arguments) here, then record what the kubelet would."""
    name = job["metadata"]["name"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    message_file = tmp_path / f"{name}.termination-log"
    terminated: dict[str, Any]
    if fail:
        terminated = {"exitCode": 1, "reason": "Error", "message": fail}
    else:
        args = [
            a.replace("/dev/termination-log", str(message_file)).replace(
                "/tmp/profile.json", str(tmp_path / f"{name}.json")
            )
            for a in container["args"]
        ]
        done = subprocess.run(
            [sys.executable, "-m", "diffcascade_worker.cli", *args, "--repeats=1", "--device=cpu"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        terminated = {"exitCode": 0, "reason": "Completed", "message": message_file.read_text()}
    core = kubernetes.client.CoreV1Api()
    core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-x1",
                "labels": {**job["spec"]["template"]["metadata"]["labels"], "job-name": name},
            },
            "spec": {"containers": [{"name": "profile", "image": container["image"]}]},
            "status": {
                "phase": "Failed" if fail else "Succeeded",
                "containerStatuses": [
                    {
                        "name": "profile",
                        "image": container["image"],
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": terminated},
                    }
                ],
            },
        },
    )
    condition = "Failed" if fail else "Complete"
    kubernetes.client.BatchV1Api().patch_namespaced_job(
        name,
        namespace,
        {"status": {"conditions": [{"type": condition, "status": "True"}]}},
    )


def test_auto_profile_job_configmap_plan_and_reprofiling(
    k8s: ThreadedKMock, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    cluster = Cluster()
    ns = "profiling"
    cluster.create_cascade(ns, _manifest(tiny_models))
    env = operator_env(prometheus_url=None, scrape_fallback=False)
    with Operator(namespace=ns, env=env):
        [job] = wait_for(lambda: _jobs(ns), timeout=60, what="a profiling Job")
        key = job["metadata"]["annotations"][PROFILE_KEY]
        assert job["metadata"]["name"] == f"{CASCADE}-profile-light-{key[:8]}"
        cond = wait_for(lambda: cluster.condition(ns, CASCADE, "Profiled"), what="Profiled")
        assert (cond["status"], cond["reason"]) == ("False", "Profiling")
        time.sleep(2)  # a few control ticks: still nothing to plan with
        assert _deployments(cluster, ns) == []
        assert not cluster.status(ns, CASCADE).get("allocation")

        _play_the_job(ns, job, tmp_path)
        cm = wait_for(
            lambda: cluster.core.read_namespaced_config_map(f"{CASCADE}-profile-light", ns),
            timeout=30,
            what="the profile ConfigMap",
        )
        assert cm.metadata.annotations[PROFILE_KEY] == key
        stored = json.loads(cm.data["profile.json"])
        table = stored["batchLatencyMs"]
        assert sorted(int(b) for b in table) == [1, 2, 4]
        assert [table[b] for b in ("1", "2", "4")] == sorted(table.values())
        assert stored["deferCurve"]["deferFractions"][-1] == 1.0

        wait_for(
            lambda: {f"{CASCADE}-light", f"{CASCADE}-heavy"} <= set(_deployments(cluster, ns)),
            timeout=30,
            what="worker Deployments after profiling",
        )
        allocation = wait_for(
            lambda: cluster.status(ns, CASCADE).get("allocation"), timeout=30, what="a plan"
        )
        assert allocation["variants"][0]["name"] == "light"
        status = cluster.status(ns, CASCADE)
        [measured] = status["profiling"]["variants"]
        assert measured["state"] == "Succeeded" and measured["batchLatencyMs"] == table
        cond = cluster.condition(ns, CASCADE, "Profiled")
        assert cond is not None and cond["status"] == "True"
        # Kopf posts events from a queue of its own, after the status patch lands.
        wait_for(lambda: cluster.events(ns, "Profiled"), timeout=30, what="a Profiled Event")

        # A spec change that changes the measurement names a new Job; what runs is left alone.
        cluster.patch_spec(ns, CASCADE, _manifest(tiny_models, steps=2)["spec"])
        second = wait_for(
            lambda: [j for j in _jobs(ns) if j["metadata"]["name"] != job["metadata"]["name"]],
            timeout=30,
            what="a second profiling Job",
        )[0]
        assert second["metadata"]["annotations"][PROFILE_KEY] != key
        assert "--steps=2" in second["spec"]["template"]["spec"]["containers"][0]["args"]
        assert {f"{CASCADE}-light", f"{CASCADE}-heavy"} <= set(_deployments(cluster, ns))

        _play_the_job(ns, second, tmp_path, fail="CUDA out of memory at batch 4")
        cond = wait_for(
            lambda: (
                (c := cluster.condition(ns, CASCADE, "Profiled"))
                and c["reason"] == "ProfilingFailed"
                and c
            ),
            timeout=30,
            what="ProfilingFailed",
        )
        assert cond["status"] == "False" and "CUDA out of memory" in cond["message"]
        wait_for(lambda: cluster.events(ns, "ProfilingFailed"), timeout=30, what="its Event")
