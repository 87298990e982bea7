"""The labels a router reads from a gated stage's answer: each image's gate confidence.

Both answer forms carry it: the JSON response (`data[].confidence`, `data[].deferred`) and the
server-sent `image_generation.completed` events of a streamed one (read as they pass, the
stream itself is relayed untouched). Images without a confidence (a stage with no gate) give
no label.
"""

from __future__ import annotations

import json

from diffcascade_worker.protocol import EVENT_COMPLETED

#: (confidence, deferred or None when the stage did not say)
Label = tuple[float, bool | None]
_MAX_BUFFER = 1 << 24


def _label(image: object) -> Label | None:
    if not isinstance(image, dict):
        return None
    confidence = image.get("confidence")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float):
        return None
    deferred = image.get("deferred")
    return float(confidence), deferred if isinstance(deferred, bool) else None


def labels_from_json(content: bytes) -> list[Label]:
    try:
        data = json.loads(content).get("data") or []
    except (ValueError, AttributeError):
        return []
    return [label for image in data if (label := _label(image)) is not None]


class CompletedEventTap:
    """Feed it the relayed byte chunks; it returns the labels of completed events seen."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Label]:
        self._buffer += chunk
        found: list[Label] = []
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            lines = block.decode("utf-8", errors="replace").splitlines()
            if f"event: {EVENT_COMPLETED}" not in lines:
                continue
            for line in lines:
                if line.startswith("data: "):
                    try:
                        label = _label(json.loads(line[len("data: ") :]))
                    except ValueError:
                        label = None
                    if label is not None:
                        found.append(label)
        if len(self._buffer) > _MAX_BUFFER:  # a stage that never ends an event: stop looking
            self._buffer = b""
        return found
