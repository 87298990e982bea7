"""Text features a CPU can afford per request: hashed word and character n-grams.

Each prompt becomes a sparse vector in a fixed space of 2^bits dimensions (the hashing
trick): word unigrams and bigrams, and character 4-grams inside words (with boundary
marks, so `portrait` and `portraits` share most of theirs). crc32 hashes them; Python's own
`hash()` is salted per process and would give every router pod a different space. Values are
scaled to unit length, so long prompts do not dominate a linear model.
"""

from __future__ import annotations

import itertools
import re
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_WORD = re.compile(r"[a-z0-9]+")
DEFAULT_BITS = 18
CHAR_N = 4
#: Characters of a prompt the features look at; the protocol allows 4,000, the signal is early.
MAX_CHARS = 1000


@dataclass(frozen=True)
class SparseVector:
    index: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]


def words(prompt: str) -> list[str]:
    return _WORD.findall(prompt[:MAX_CHARS].lower())


def _grams(tokens: list[str]) -> list[str]:
    grams = [f"w:{t}" for t in tokens]
    grams += [f"b:{a} {b}" for a, b in itertools.pairwise(tokens)]
    for token in tokens:
        marked = f"<{token}>"
        if len(marked) <= CHAR_N:
            grams.append(f"c:{marked}")
        else:
            grams += [f"c:{marked[i : i + CHAR_N]}" for i in range(len(marked) - CHAR_N + 1)]
    return grams


class HashedNgrams:
    """prompt -> unit-length sparse vector of hashed n-gram counts (signed, to cancel
    collisions on average)."""

    def __init__(self, bits: int = DEFAULT_BITS) -> None:
        if not 8 <= bits <= 24:
            raise ValueError(f"bits must lie in [8, 24], got {bits}")
        self.bits = bits
        self.dim = 1 << bits
        self._mask = self.dim - 1

    def transform(self, prompt: str) -> SparseVector:
        counts: dict[int, float] = {}
        for gram in _grams(words(prompt)):
            h = zlib.crc32(gram.encode())
            slot = h & self._mask
            sign = 1.0 if (h >> 31) & 1 == 0 else -1.0
            counts[slot] = counts.get(slot, 0.0) + sign
        if not counts:
            return SparseVector(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
        index = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        value = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        norm = float(np.sqrt(np.dot(value, value)))
        return SparseVector(index, value / norm if norm > 0 else value)
