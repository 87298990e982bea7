"""Client API keys: who may generate, when the entry stage is not open to everyone it admits.

Off unless `--api-keys PATH` is given. PATH is a file with one key per line, or a folder (a
Kubernetes Secret mounted as a volume) whose every file holds keys, one per line; blank lines
and `#` comments are skipped. A client sends a key as OpenAI's clients do, `Authorization:
Bearer <key>`; anything else is a 401 in OpenAI's error envelope. Keys are read again when
the files change (a rotated Secret), at most every `RELOAD_S`, without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

from diffcascade_worker.serving.errors import InvalidApiKey, Unauthorized

logger = logging.getLogger(__name__)

#: How often at most the key files are checked for changes.
RELOAD_S = 10.0


class ApiKeyError(ValueError):
    """The key source cannot be used (missing, unreadable, empty); the message says which."""


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        # A mounted Secret: one file per key of the Secret, beside `..data`-style links.
        return sorted(f for f in path.iterdir() if not f.name.startswith(".") and f.is_file())
    return [path]


def read_keys(path: Path) -> frozenset[str]:
    """Every key in `path` (a file, or a folder of files); raises ApiKeyError."""
    keys: set[str] = set()
    try:
        for file in _files(path):
            for line in file.read_text(encoding="utf-8").splitlines():
                key = line.strip()
                if key and not key.startswith("#"):
                    keys.add(key)
    except (OSError, UnicodeDecodeError) as error:
        raise ApiKeyError(f"cannot read API keys from {path}: {error}") from None
    if not keys:
        raise ApiKeyError(f"no API keys in {path}: give at least one key, one per line")
    return frozenset(keys)


def _signature(path: Path) -> tuple[object, ...]:
    """Changes when a key file does (Kubernetes swaps a `..data` link on a Secret update)."""
    try:
        return tuple(
            (str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in _files(path)
        )
    except OSError:
        return ()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The accepted keys of one worker (or router), re-read when their files change."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._digests = [_digest(k) for k in read_keys(path)]
        self._signature = _signature(path)
        self._checked_at = clock()

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, presented: str | None) -> None:
        """Raise InvalidApiKey unless `presented` is one of the keys."""
        self._reload_if_changed()
        if not presented:
            raise InvalidApiKey(
                "this cascade needs an API key: send it as 'Authorization: Bearer <key>'"
            )
        digest = _digest(presented)
        # Compared with every key, not stopping at a match: the time taken says nothing.
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise InvalidApiKey("incorrect API key provided")

    def _reload_if_changed(self) -> None:
        now = self._clock()
        if now - self._checked_at < RELOAD_S:
            return
        self._checked_at = now
        signature = _signature(self.path)
        if signature == self._signature:
            return
        try:
            keys = read_keys(self.path)
        except ApiKeyError as error:
            logger.warning("%s; keeping the %d keys read before", error, len(self._digests))
            return
        self._digests = [_digest(k) for k in keys]
        self._signature = signature
        logger.info("API keys re-read from %s: %d keys", self.path, len(keys))


def check_config_token(expected: SecretStr | None, token: str | None) -> None:
    """Raise Unauthorized unless the config API is open (`expected` None) or `token` is its
    bearer token: the one check a worker's and a router's config API share."""
    if expected is None:
        return
    if token is None or not hmac.compare_digest(
        token.encode(), expected.get_secret_value().encode()
    ):
        raise Unauthorized("a valid bearer token is required to read or change the config")
