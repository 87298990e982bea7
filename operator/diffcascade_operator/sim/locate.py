"""Where the bundled scenarios and traces live: `bench/` of the source tree.

They are benchmark data, not package data, so they are found from a clone (an editable
install) by walking up from this file, or from the working directory.
"""

from __future__ import annotations

from pathlib import Path


def bundled_dir(kind: str) -> Path | None:
    """`bench/<kind>` (kind is `scenarios` or `traces`) of the nearest source tree, if any."""
    starts = [Path(__file__).resolve().parent, Path.cwd().resolve()]
    for start in starts:
        for folder in (start, *start.parents):
            candidate = folder / "bench" / kind
            if candidate.is_dir():
                return candidate
    return None
