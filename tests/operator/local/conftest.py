"""A cascade file over the session's tiny models, tuned so a small load step scales it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from local_support import cascade_doc


@pytest.fixture
def cascade_file(tiny_models: dict[str, Path], tmp_path: Path) -> Path:
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(cascade_doc(tiny_models)))
    return path
