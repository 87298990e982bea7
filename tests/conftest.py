"""Process-wide test settings and the tiny models every layer's tests share."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "diffserve"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{'light': DIR, 'heavy': DIR}: tiny random-weight SD pipelines built offline, once.

    The light folder also holds the tiny discriminator checkpoint and its calibrated curve.
    """
    from diffcascade_worker.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {kind: make_tiny_model(kind, root / kind) for kind in ("light", "heavy")}


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{family: DIR} of the real models' topologies at toy widths, built offline, once:
    sd-turbo, sdxs, sdxl (pipeline folders), sdxl-lightning (a folder of one UNet file, as on
    the hub) and sd15-safety (SD 1.x with a safety checker that flags every image)."""
    from diffcascade_worker.models.tiny_families import FAMILIES, make_tiny_family

    root = tmp_path_factory.mktemp("families")
    return {family: make_tiny_family(family, root / family) for family in FAMILIES}
