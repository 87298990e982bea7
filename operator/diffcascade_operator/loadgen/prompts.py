"""Prompt lists for load replay: a file, or the real DiffusionDB prompts bundled with the demo."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


class PromptsError(ValueError):
    """A prompts file that cannot be used."""


def bundled_prompts_path() -> Path:
    """The 1,000 DiffusionDB prompts shipped in the package (CC0; see PROMPTS-ATTRIBUTION.md)."""
    return Path(str(resources.files("diffcascade_operator.local") / "prompts.txt"))


def load_prompts(path: Path | None = None) -> tuple[str, ...]:
    """Non-blank lines of `path` (default: the bundled prompts), stripped."""
    source = path or bundled_prompts_path()
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptsError(f"cannot read prompts file {source}: {exc}") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise PromptsError(f"prompts file {source} has no prompts")
    return prompts
