"""The state document of a local run: served at /v1/cascade/plan and written to state.json.

`diffcascade status` reads the file; the live view renders the same document, so what the
terminal shows and what `status` prints cannot disagree.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from diffcascade_operator.plan import Plan

STATE_FILE = "state.json"
DEFAULT_RUNS_DIR = Path("runs") / "local"


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    doc = asdict(plan)
    doc.pop("scale_down_since", None)  # hysteresis bookkeeping, not for display
    plain: dict[str, Any] = json.loads(json.dumps(doc, default=str))  # enums -> strings
    return plain


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Atomic: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_state(path: Path) -> dict[str, Any]:
    """The state document; ValueError with the reason when it cannot be read."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read local state {path}: {exc}") from None
    if not isinstance(doc, dict) or "cascade" not in doc:
        raise ValueError(f"{path} is not a diffcascade state file")
    return doc


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
