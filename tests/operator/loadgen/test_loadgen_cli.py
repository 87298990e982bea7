"""`diffcascade load` against real servers: a worker, the router, and nobody at all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from diffcascade_operator.loadgen.cli import load
from diffcascade_operator.loadgen.client import generations_url
from diffcascade_operator.local.router import Router
from diffcascade_operator.local.supervisor import Worker
from diffcascade_worker.serving.api_keys import ApiKeys

REPORT_KEYS = {
    "slo_violation_ratio",
    "latency_s",
    "light_share",
    "deferred",
    "degraded",
    "errors",
    "total",
    "succeeded",
    "late",
    "served_by",
}


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(load, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "http://127.0.0.1:9", "--trace", "x", "--qps", "2"], "alternatives"),
        (["--url", "http://127.0.0.1:9"], "give --trace"),
        (["--url", "http://127.0.0.1:9", "--qps", "2"], "needs --duration"),
        (["--url", "127.0.0.1:9", "--qps", "2", "--duration", "1"], "http://"),
        (["--url", "http://127.0.0.1:9", "--trace", "/no/such/trace.txt"], "neither a file"),
        (
            ["--url", "http://h", "--qps", "1", "--duration", "1", "--prompts", "/no/such.txt"],
            "cannot read prompts",
        ),
        (["--url", "http://h", "--qps", "1", "--duration", "1", "--size", "big"], "512x512"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    code, output = _invoke(*args)
    assert code == 2
    assert message in output
    assert "Traceback" not in output


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_nobody_listening_fails_at_once_instead_of_after_the_whole_replay(
    tmp_path: Path,
) -> None:
    report = tmp_path / "r.json"
    started = time.monotonic()
    code, output = _invoke(
        "--url",
        f"http://127.0.0.1:{_closed_port()}",
        "--qps",
        "10",
        "--duration",
        "30",
        "--report",
        str(report),
    )
    assert code == 1 and time.monotonic() - started < 10
    assert "cannot connect to http://127.0.0.1:" in output and "diffcascade up" in output
    assert not report.exists()


@pytest.mark.parametrize(
    ("given", "endpoint"),
    [
        ("http://h:8080", "http://h:8080/v1/images/generations"),
        ("http://h:8080/", "http://h:8080/v1/images/generations"),
        ("http://h:8080/v1", "http://h:8080/v1/images/generations"),  # the SDK's base_url
        ("http://h:8080/v1/", "http://h:8080/v1/images/generations"),
        ("http://h/v1/images/generations", "http://h/v1/images/generations"),
        ("http://h/stages/heavy", "http://h/stages/heavy/v1/images/generations"),
    ],
)
def test_load_takes_the_entry_the_sdk_base_url_or_the_endpoint(given: str, endpoint: str) -> None:
    assert generations_url(given) == endpoint


@pytest.fixture
def empty_router() -> Iterator[str]:
    """The local router with no replica: every generation gets 503 + Retry-After."""
    with _router_in_a_thread() as url:
        yield url


@contextlib.contextmanager
def _router_in_a_thread(**options: Any) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    router = Router(variants=["light", "heavy"], plan=dict, **options)
    url = loop.run_until_complete(router.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(router.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def test_a_url_answering_404_gets_a_hint_naming_the_urls_load_takes(
    empty_router: str, tmp_path: Path
) -> None:
    code, output = _invoke(
        "--url", f"{empty_router}/nothing/here", "--qps", "10", "--duration", "0.3"
    )
    assert code == 1
    assert "got 404 from " in output and "the OpenAI SDK's base URL (http://HOST:PORT/v1)" in output


def test_http_errors_are_counted_by_status(empty_router: str, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    code, _ = _invoke(
        "--url", empty_router, "--qps", "20", "--duration", "0.5", "--report", str(report)
    )
    assert code == 1
    doc = json.loads(report.read_text())
    assert set(doc["errors"]) == {"http_503"}
    assert doc["errors"]["http_503"] == doc["total"] > 0


def test_the_api_key_is_sent_as_openais_clients_send_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-load\n")
    report = tmp_path / "r.json"
    errors = []
    with _router_in_a_thread(api_keys=ApiKeys(keys)) as url:  # keyed, and no replica
        for extra in ([], ["--api-key", "sk-load"]):
            args = ["--url", url, "--qps", "20", "--duration", "0.3", "--report", str(report)]
            _invoke(*args, *extra)
            errors.append(set(json.loads(report.read_text())["errors"]))
    assert errors == [{"http_401"}, {"http_503"}]  # refused; then past the key check


@pytest.mark.slow
def test_load_against_a_real_worker_writes_report_plots_and_images(
    light_worker: Worker, tmp_path: Path
) -> None:
    report = tmp_path / "out" / "report.json"
    images = tmp_path / "images"
    code, output = _invoke(
        "--url",
        light_worker.url,
        "--qps",
        "4",
        "--duration",
        "3",
        "--slo-seconds",
        "10",
        "--report",
        str(report),
        "--save-images",
        str(images),
        "--save-count",
        "3",
    )
    assert code == 0, output
    doc = json.loads(report.read_text())
    assert set(doc) >= REPORT_KEYS
    assert {"p50", "p90", "p99"} <= set(doc["latency_s"])
    assert doc["succeeded"] == doc["total"] > 0
    assert doc["light_share"] == 1.0  # no next stage: nothing is deferred
    assert doc["served_by"] == {"light": doc["total"]}
    for name in ("latency.png", "deferral.png", "report-requests.csv"):
        assert (report.parent / name).stat().st_size > 0
    saved = sorted(images.glob("*.png"))
    assert 1 <= len(saved) <= 3
    assert saved[0].read_bytes()[:4] == b"\x89PNG"
    listed = set(doc["files"])  # every file the run wrote: relative beside the report
    assert {"report.json", "latency.png", "deferral.png", "report-requests.csv"} <= listed
    assert {str(p) for p in saved} <= listed  # the images, elsewhere: their full path


@pytest.mark.slow
def test_a_trace_replay_honours_arrival_times(light_worker: Worker, tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    trace.write_text("0,1\n1500,2\n3000,3\n")
    report = tmp_path / "r.json"
    code, output = _invoke(
        "--url", light_worker.url, "--trace", str(trace), "--report", str(report), "--json"
    )
    assert code == 0, output
    doc = json.loads(report.read_text())
    assert doc["total"] == 3
    assert doc["wall_s"] >= 3.0  # the last request left at 3 s, not at once
