"""Client API keys at the router, the cascade's one door: a real `diffcascade-worker route
--api-keys` process in front of two workers (fake engines, served in-process: 'hard...'
prompts get gate confidence 0.1 and are deferred, 'easy...' 0.9) refuses a request without
one of the keys with the workers' 401 in OpenAI's envelope, whichever stage the plan would
send it to (the gated entry stage or straight to heavy), and passes the client's key on, so
stages that check keys too (no NetworkPolicy in front of them) serve it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner
from diffcascade_worker.protocol import (
    HEADER_ROUTED_TO,
    PATH_GENERATIONS,
    PATH_HEALTHZ,
    PATH_METRICS,
    PATH_MODELS,
    PATH_READYZ,
    PATH_ROUTER_CONFIG,
)
from diffcascade_worker.routing.app import create_router_app
from diffcascade_worker.routing.route_command import route
from diffcascade_worker.routing.service import RouterService, RouterSettings
from diffcascade_worker.serving import api_keys
from diffcascade_worker.serving.service import WorkerService
from diffcascade_worker.serving.settings import WorkerSettings
from prometheus_client.parser import text_string_to_metric_families
from worker_testing import FakeEngine, fake_loader, free_port, served_in_process

TOKEN = "router-token"
GOOD, OTHER = "sk-team-a", "sk-team-b"


def _keys(tmp_path: Path) -> Path:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# the cascade's clients\n{GOOD}\n{OTHER}\n")
    return keys


def _worker(variant: str, engine: FakeEngine, **overrides: Any) -> WorkerService:
    settings = WorkerSettings(
        model="fake", variant=variant, cascade="c", size=64, token="t", slo_seconds=30, **overrides
    )
    return WorkerService(settings, engine_loader=fake_loader(engine))


@contextlib.asynccontextmanager
async def _router_process(keys: Path, *, light: str, heavy: str, logs: Path) -> AsyncIterator[str]:
    """`diffcascade-worker route` as the router Deployment runs it, plan r = 0 to start."""
    port = free_port()
    command = [
        sys.executable,
        "-c",
        "from diffcascade_worker.cli import main; main()",
        "route",
        *("--cascade", "c", "--port", str(port), "--token", TOKEN, "--log-level", "warning"),
        *("--entry-url", light, "--entry-variant", "light"),
        *("--heavy-url", heavy, "--heavy-variant", "heavy"),
        *("--router-share", "0", "--exploration-share", "0", "--scorer", "rule"),
        *("--api-keys", str(keys)),
    ]
    log = logs / f"router-{port}.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            for _ in range(600):  # the workers serve on this loop: wait without blocking it
                assert process.returncode is None, log.read_text()
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url + PATH_READYZ)).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"router not ready:\n{log.read_text()}")
        yield url
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=30)


async def _plan(
    client: httpx.AsyncClient, router: str, share: float, stages: dict[str, str]
) -> None:
    """The operator's plan push: its config token, no client key (exempt, as on a worker)."""
    body = {
        "entry_url": stages["light"],
        "entry_variant": "light",
        "heavy_url": stages["heavy"],
        "heavy_variant": "heavy",
        "router_share": share,
        "exploration_share": 0.0,
        "scorer": "rule",
    }
    put = await client.put(
        router + PATH_ROUTER_CONFIG, json=body, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert put.status_code == 200, put.text


def _routed(text: str, target: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "diffcascade_router_routed_images_total" and s.labels["target"] == target
    )


def _refused_in_openais_envelope(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_the_router_needs_a_key_for_the_entry_stage_and_straight_to_heavy_alike(
    tmp_path: Path,
) -> None:
    light_engine, heavy_engine = FakeEngine(), FakeEngine(gate=False)
    heavy = _worker("heavy", heavy_engine)
    async with served_in_process(heavy) as heavy_url:
        light = _worker("light", light_engine, next_stage_url=heavy_url, threshold=0.5)
        async with (
            served_in_process(light) as light_url,
            _router_process(
                _keys(tmp_path), light=light_url, heavy=heavy_url, logs=tmp_path
            ) as router,
            httpx.AsyncClient(base_url=router, timeout=30) as client,
        ):
            stages = {"light": light_url, "heavy": heavy_url}
            warm_up = [sum(len(b) for b in e.batches) for e in (light_engine, heavy_engine)]

            def sdk(key: str) -> openai.AsyncOpenAI:
                return openai.AsyncOpenAI(
                    api_key=key, base_url=f"{router}/v1", max_retries=0, timeout=30
                )

            answers: dict[str, Any] = {}
            for share, target in ((0.0, "entry"), (1.0, "heavy")):
                await _plan(client, router, share, stages)
                prompt = {"prompt": f"easy prompt for {target}"}
                missing = await client.post(PATH_GENERATIONS, json=prompt)
                wrong = await client.post(
                    PATH_GENERATIONS, json=prompt, headers={"Authorization": "Bearer sk-nope"}
                )
                token = await client.post(
                    PATH_GENERATIONS, json=prompt, headers={"Authorization": f"Bearer {TOKEN}"}
                )
                for refused in (missing, wrong, token):  # the config token is no client key
                    _refused_in_openais_envelope(refused)
                assert "Authorization: Bearer" in missing.json()["error"]["message"]
                with pytest.raises(openai.AuthenticationError) as sdk_refused:
                    async with sdk("sk-nope") as refusing:
                        await refusing.images.generate(prompt=prompt["prompt"])
                assert sdk_refused.value.code == "invalid_api_key"
                good = await client.post(
                    PATH_GENERATIONS, json=prompt, headers={"Authorization": f"Bearer {GOOD}"}
                )
                assert good.status_code == 200, good.text
                assert good.headers[HEADER_ROUTED_TO] == target
                async with sdk(OTHER) as keyed:
                    sdk_good = await keyed.images.generate(prompt=prompt["prompt"])
                answers[target] = (good.json()["data"][0], sdk_good)
            models = [
                (await client.get(PATH_MODELS, headers=h)).status_code
                for h in ({}, {"Authorization": f"Bearer {GOOD}"})
            ]
            open_paths = [
                (await client.get(p)).status_code for p in (PATH_HEALTHZ, PATH_READYZ, PATH_METRICS)
            ]
            metrics = (await client.get(PATH_METRICS)).text
    # The stage's answer, unchanged: the entry stage served the easy prompt itself; with
    # r = 1 the heavy stage did, no light image made.
    for target, served_by in (("entry", "light"), ("heavy", "heavy")):
        image, sdk_result = answers[target]
        assert image["served_by"] == served_by and image["deferred"] is False
        assert sdk_result.data is not None and len(sdk_result.data) == 1
        assert (sdk_result.data[0].model_extra or {})["served_by"] == served_by
    assert models == [401, 200] and open_paths == [200, 200, 200]  # probes, Prometheus
    # Refused requests reached no stage and are no demand: two good ones per target.
    assert _routed(metrics, "entry") == _routed(metrics, "heavy") == 2
    images = [sum(len(b) for b in e.batches) for e in (light_engine, heavy_engine)]
    assert [n - w for n, w in zip(images, warm_up, strict=True)] == [2, 2]


async def test_stages_that_check_keys_too_get_the_clients_key_from_the_router_and_each_other(
    tmp_path: Path,
) -> None:
    """Without a NetworkPolicy in front of the stages every stage checks keys: the router
    passes the client's key on, and so does a deferring stage."""
    keys = _keys(tmp_path)
    heavy = _worker("heavy", FakeEngine(gate=False), api_keys=keys)
    async with served_in_process(heavy) as heavy_url:
        light = _worker(
            "light", FakeEngine(), next_stage_url=heavy_url, threshold=0.5, api_keys=keys
        )
        async with (
            served_in_process(light) as light_url,
            _router_process(keys, light=light_url, heavy=heavy_url, logs=tmp_path) as router,
            httpx.AsyncClient(timeout=30) as client,
        ):
            stages = {"light": light_url, "heavy": heavy_url}
            good = {"Authorization": f"Bearer {GOOD}"}
            deferred = await client.post(
                router + PATH_GENERATIONS, json={"prompt": "hard one"}, headers=good
            )
            await _plan(client, router, 1.0, stages)
            routed = await client.post(
                router + PATH_GENERATIONS, json={"prompt": "easy one"}, headers=good
            )
            direct = await client.post(heavy_url + PATH_GENERATIONS, json={"prompt": "x"})
    assert deferred.status_code == 200, deferred.text
    image = deferred.json()["data"][0]
    # Deferred by the gate and served by heavy, which checked the key the light stage passed.
    assert (image["served_by"], image["deferred"], image["degraded"]) == ("heavy", True, False)
    assert routed.status_code == 200 and routed.headers[HEADER_ROUTED_TO] == "heavy"
    assert routed.json()["data"][0]["served_by"] == "heavy"
    _refused_in_openais_envelope(direct)


def test_route_refuses_to_start_with_a_keys_file_without_keys(tmp_path: Path) -> None:
    empty = tmp_path / "keys.txt"
    empty.write_text("# nobody yet\n\n")
    args = ["--port", "0", "--token", "t", "--api-keys", str(empty)]
    result = CliRunner().invoke(route, args)
    assert result.exit_code == 2, result.output
    assert "--api-keys: no API keys in" in result.output


async def test_the_router_reads_rotated_keys_again_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers' re-read, in the router: a key passes the check (then 503: no plan yet)
    until the Secret drops it."""
    monkeypatch.setattr(api_keys, "RELOAD_S", 0.0)  # read again at every request
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-old\n")
    service = RouterService(RouterSettings(cascade="c", token=TOKEN, api_keys=keys))
    transport = httpx.ASGITransport(app=create_router_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:

        async def status(key: str) -> int:
            headers = {"Authorization": f"Bearer {key}"}
            answer = await client.post(PATH_GENERATIONS, json={"prompt": "a"}, headers=headers)
            return answer.status_code

        before = [await status("sk-old"), await status("sk-new")]
        keys.write_text("sk-new\n")
        os.utime(keys, ns=(1, 1))  # a new signature even within the clock's resolution
        after = [await status("sk-old"), await status("sk-new")]
    await service.close()
    assert before == [503, 401] and after == [401, 503]
