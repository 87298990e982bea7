"""A private Prometheus for a local cascade, when the `prometheus` binary is installed.

Targets come from a file_sd JSON file that Prometheus watches, so adding and removing workers
needs no reload. The entry URL, which does not move during a run, is a static target: its
router series count every arrival of the cascade (the demand). Its data lives in a temporary
folder removed at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from diffcascade_operator.local.supervisor import free_port, spawn, stop_processes


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class LocalPrometheus:
    def __init__(self, *, binary: str, log_path: Path, scrape_interval_s: float = 1.0) -> None:
        self.binary = binary
        self.log_path = log_path
        self.scrape_interval_s = scrape_interval_s
        self.url = ""
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._targets_json: str | None = None  # what targets_file holds

    @property
    def targets_file(self) -> Path:
        assert self._dir is not None
        return self._dir / "targets.json"

    def launch(self, *, host: str = "127.0.0.1", router: str | None = None) -> str:
        """Start the process (from the event loop's thread, see supervisor); returns its URL.
        `router`: the entry URL's `host:port`, scraped as a static target."""
        self._dir = Path(tempfile.mkdtemp(prefix="diffcascade-prometheus-"))
        self._targets_json = None
        self.set_targets({})
        interval = f"{max(1, round(self.scrape_interval_s * 1000))}ms"
        config = self._dir / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n"
            "scrape_configs:\n  - job_name: diffcascade-workers\n"
            f"    scrape_timeout: {interval}\n"
            f"    file_sd_configs:\n      - files: ['{self.targets_file}']\n"
            "        refresh_interval: 1s\n"
            + (
                "  - job_name: diffcascade-router\n"
                f"    scrape_timeout: {interval}\n"
                f"    static_configs:\n      - targets: ['{router}']\n"
                if router
                else ""
            ),
            encoding="utf-8",
        )
        port = free_port(host)
        self.url = f"http://{host}:{port}"
        self._process = spawn(
            [
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self._dir / 'data'}",
                "--storage.tsdb.retention.time=2h",
                f"--web.listen-address={host}:{port}",
                "--log.level=warn",
            ],
            log_path=self.log_path,
        )
        return self.url

    async def wait_ready(self, *, timeout_s: float = 30.0) -> None:
        """RuntimeError (after stopping it) if Prometheus does not come up."""
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self._process is None or self._process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"prometheus exited at start-up; see {self.log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/-/ready")).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {timeout_s:.0f} s; see {self.log_path}")

    def set_targets(self, targets: Mapping[str, Sequence[str]]) -> None:
        """Scrape these `host:port` targets (by variant); written atomically."""
        if self._dir is None:
            return
        groups = [
            {"targets": list(addresses), "labels": {"stage": variant}}
            for variant, addresses in sorted(targets.items())
            if addresses
        ]
        text = json.dumps(groups)
        if text == self._targets_json:
            return  # called every reconcile; a rewrite would only make Prometheus re-read it
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.targets_file)
        self._targets_json = text

    def stop(self) -> None:
        if self._process is not None:
            stop_processes([self._process], grace_s=5.0)
            self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
