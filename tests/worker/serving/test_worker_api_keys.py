"""Client API keys: off by default; with `--api-keys`, generation and the model list need one of
the keys (bearer auth, 401 in OpenAI's envelope), probes and metrics stay open, a rotated
Secret takes effect without a restart, and an unusable key source stops the start."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from click.testing import CliRunner
from diffcascade_worker.protocol import (
    PATH_CONFIG,
    PATH_GENERATIONS,
    PATH_HEALTHZ,
    PATH_METRICS,
    PATH_MODELS,
    PATH_READYZ,
)
from diffcascade_worker.serving import api_keys
from diffcascade_worker.serving.api_keys import ApiKeyError, ApiKeys
from diffcascade_worker.serving.app import create_app
from diffcascade_worker.serving.serve_command import serve
from diffcascade_worker.serving.service import WorkerService
from diffcascade_worker.serving.settings import WorkerSettings
from worker_testing import FakeEngine, fake_loader, served_in_process

TOKEN = "config-token"


def _mounted_secret(folder: Path, keys: dict[str, str]) -> Path:
    """A Secret as the kubelet mounts it: files are links into `..data`, swapped at once on
    an update."""
    folder.mkdir(parents=True, exist_ok=True)
    version = folder / f"..version-{len(list(folder.glob('..version-*')))}"
    version.mkdir()
    for name, value in keys.items():
        (version / name).write_text(value)
    data = folder / "..data"
    staged = folder / "..data_tmp"
    staged.symlink_to(version.name)
    os.replace(staged, data)
    for name in keys:
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)
    return folder


@asynccontextmanager
async def _worker(keys: Path | None, **overrides: Any) -> AsyncIterator[str]:
    settings = WorkerSettings(
        model="fake",
        variant="light",
        cascade="c",
        size=64,
        token=TOKEN,
        api_keys=keys,
        **overrides,
    )
    service = WorkerService(settings, engine_loader=fake_loader(FakeEngine()))
    async with served_in_process(service) as url:
        yield url


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_without_api_keys_generation_is_open() -> None:
    async with _worker(None) as url, httpx.AsyncClient(base_url=url) as client:
        answer = await client.post(PATH_GENERATIONS, json={"prompt": "a cat"})
    assert answer.status_code == 200


async def test_generation_needs_one_of_the_keys_in_openais_envelope(tmp_path: Path) -> None:
    secret = _mounted_secret(tmp_path / "keys", {"team-a": "sk-a\n", "team-b": "sk-b1\nsk-b2\n"})
    async with _worker(secret) as url, httpx.AsyncClient(base_url=url) as client:
        missing = await client.post(PATH_GENERATIONS, json={"prompt": "a cat"})
        wrong = await client.post(PATH_GENERATIONS, json={"prompt": "x"}, headers=_bearer("sk-z"))
        config_token = await client.post(
            PATH_GENERATIONS, json={"prompt": "x"}, headers=_bearer(TOKEN)
        )
        served = [
            await client.post(PATH_GENERATIONS, json={"prompt": "x"}, headers=_bearer(key))
            for key in ("sk-a", "sk-b1", "sk-b2")
        ]
        models_without = await client.get(PATH_MODELS)
        models_with = await client.get(PATH_MODELS, headers=_bearer("sk-a"))
        open_paths = [(await client.get(path)).status_code for path in (PATH_HEALTHZ, PATH_READYZ)]
        metrics = await client.get(PATH_METRICS)
        config_with_key = await client.get(PATH_CONFIG, headers=_bearer("sk-a"))
        config_with_token = await client.get(PATH_CONFIG, headers=_bearer(TOKEN))
    for refused in (missing, wrong, config_token, models_without):
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["type"] == "invalid_request_error"
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    assert [r.status_code for r in served] == [200, 200, 200]
    assert models_with.status_code == 200
    assert open_paths == [200, 200] and metrics.status_code == 200  # probes, Prometheus
    assert (config_with_key.status_code, config_with_token.status_code) == (401, 200)


async def test_the_sdk_raises_authentication_error_for_a_wrong_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# the payments team\nsk-good\n")
    service = WorkerService(
        WorkerSettings(model="fake", variant="light", size=64, api_keys=keys),
        engine_loader=fake_loader(FakeEngine()),
    )
    service.start()
    await service.loaded.wait()
    transport = httpx2.ASGITransport(app=create_app(service))

    def sdk(key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key=key,
            base_url="http://worker/v1",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=transport),
        )

    try:
        with pytest.raises(openai.AuthenticationError) as refused:
            await sdk("sk-bad").images.generate(prompt="a cat")
        result = await sdk("sk-good").images.generate(prompt="a cat")
    finally:
        await service.close()
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    assert result.data is not None and len(result.data) == 1


def test_a_rotated_secret_takes_effect_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    secret = _mounted_secret(tmp_path / "keys", {"key": "sk-old\n"})
    keys = ApiKeys(secret, clock=lambda: now[0])
    keys.check("sk-old")
    _mounted_secret(secret, {"key": "sk-new\n"})  # the kubelet swaps `..data`
    keys.check("sk-old")  # not re-read before RELOAD_S
    now[0] += api_keys.RELOAD_S
    keys.check("sk-new")
    with pytest.raises(Exception, match="incorrect API key"):
        keys.check("sk-old")
    for file in secret.iterdir():  # a Secret emptied by mistake does not open the door
        if file.name == "key":
            file.unlink()
    now[0] += api_keys.RELOAD_S
    keys.check("sk-new")


@pytest.mark.parametrize("content", ["", "# only a comment\n\n"])
def test_an_empty_key_source_is_refused_at_start(tmp_path: Path, content: str) -> None:
    empty = tmp_path / "keys.txt"
    empty.write_text(content)
    with pytest.raises(ApiKeyError, match="no API keys"):
        ApiKeys(empty)
    args = ["--model", "org/m", "--variant", "v", "--token", "t", "--api-keys", str(empty)]
    result = CliRunner().invoke(serve, [*args, "--port", "0"])
    assert result.exit_code == 2, result.output
    assert "--api-keys: no API keys in" in result.output


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_deferral_carries_the_clients_key_to_a_next_stage_that_checks_keys(
    tmp_path: Path, stream: bool
) -> None:
    """Without a router every stage checks keys (a plan may enter at any of them): a deferred
    query must reach the next stage with the client's key, not come back degraded."""
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-a\n")
    heavy_settings = WorkerSettings(
        model="fake", variant="heavy", cascade="c", size=64, token=TOKEN, api_keys=keys
    )
    heavy = WorkerService(heavy_settings, engine_loader=fake_loader(FakeEngine(gate=False)))
    async with (
        served_in_process(heavy) as heavy_url,
        _worker(keys, next_stage_url=heavy_url, threshold=0.5) as light_url,
        httpx.AsyncClient(base_url=light_url, timeout=30) as client,
    ):
        body = {"prompt": "hard to draw", "stream": stream}
        answer = await client.post(PATH_GENERATIONS, json=body, headers=_bearer("sk-a"))
        direct = await client.post(heavy_url + PATH_GENERATIONS, json={"prompt": "x"})
    assert answer.status_code == 200, answer.text
    if stream:
        completed = answer.text.split("event: image_generation.completed\ndata: ")[1]
        image = json.loads(completed.split("\n", 1)[0])
    else:
        image = answer.json()["data"][0]
    assert (image["served_by"], image.get("degraded", False)) == ("heavy", False)
    assert direct.status_code == 401  # the heavy stage does check keys
