"""GPUs of this machine for `diffcascade up`: each worker process gets devices of its own.

On a cluster every worker pod asks for `nvidia.com/gpu: gpusPerReplica` and the device plugin
hands it its own GPUs. Here `up` does the same with CUDA_VISIBLE_DEVICES: the GPUs it may use
are those CUDA_VISIBLE_DEVICES lists (when set) or those `nvidia-smi` finds; each worker it
starts gets `gpusPerReplica` of the free ones (seeing them as cuda:0, ...), and they are free
again when the worker exits. A variant with gpusPerReplica 0, and every worker on a machine
without GPUs, gets an empty CUDA_VISIBLE_DEVICES / none at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping

Runner = Callable[[list[str]], str | None]


def _nvidia_smi(argv: list[str]) -> str | None:
    binary = shutil.which(argv[0])
    if binary is None:
        return None
    try:
        done = subprocess.run(
            [binary, *argv[1:]], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def visible_gpus(
    env: Mapping[str, str] | None = None, *, run: Runner = _nvidia_smi
) -> tuple[str, ...]:
    """The GPU ids `up` may hand out: CUDA_VISIBLE_DEVICES' entries when it is set (empty:
    none), else the indices `nvidia-smi` lists, else none."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return tuple(d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip())
    out = run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"])
    if not out:
        return ()
    return tuple(line.strip() for line in out.splitlines() if line.strip())


class GpuAssigner:
    """Which worker holds which GPUs: `pick` free ones, `hold` them for a worker, and they
    are free again once `keep_only` no longer lists that worker."""

    def __init__(self, gpus: Iterable[str]) -> None:
        self.gpus = tuple(gpus)
        self._held: dict[object, tuple[str, ...]] = {}

    def free(self) -> list[str]:
        held = {d for devices in self._held.values() for d in devices}
        return [g for g in self.gpus if g not in held]

    def pick(self, count: int) -> tuple[str, ...] | None:
        """`count` free GPUs (None: not enough free); () without GPUs or for count 0."""
        if not self.gpus or count <= 0:
            return ()
        free = self.free()
        return tuple(free[:count]) if len(free) >= count else None

    def hold(self, holder: object, devices: tuple[str, ...]) -> None:
        if devices:
            self._held[holder] = devices

    def keep_only(self, holders: Iterable[object]) -> None:
        """Release what holders no longer alive hold."""
        alive = set(map(id, holders))
        for holder in [h for h in self._held if id(h) not in alive]:
            del self._held[holder]

    def env(self, devices: tuple[str, ...]) -> dict[str, str]:
        """The worker's CUDA_VISIBLE_DEVICES (empty: no GPU, even on a GPU machine)."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(devices)} if self.gpus else {}
