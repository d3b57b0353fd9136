"""A real Prometheus (Debian's package) for tests, with file-based service discovery: a test adds a scrape
target by writing a JSON file, and removes it by deleting the file."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import procs
from .paths import state_dir
from .system import HarnessError, ensure_packages, wait_for

PROMETHEUS_PORT = int(os.environ.get("KUBETUNE_PROMETHEUS_PORT", "19090"))
SCRAPE_INTERVAL = "5s"  # = the scrape timeout: a loaded 2-core machine answers slowly


@dataclass(frozen=True)
class Prometheus:
    url: str
    targets_dir: Path

    def add_target(self, job: str, target: str, labels: dict[str, str] | None = None) -> Path:
        """Scrape `target` (host:port) as `job` until the returned file is deleted."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{job}-{target}")
        path = self.targets_dir / f"{safe}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": [target], "labels": {"job": job, **(labels or {})}}]))
        tmp.rename(path)
        return path

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raise HarnessError(f"Prometheus rejected {promql!r}: {err.read().decode()[:500]}") from err
        if body.get("status") != "success":
            raise HarnessError(f"Prometheus query {promql!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for_series(self, promql: str, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(1)


def _config(targets_dir: Path) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [{
            "job_name": "file-sd",
            "file_sd_configs": [{"files": [f"{targets_dir}/*.json"], "refresh_interval": "1s"}],
        }],
    }


def _ready(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as resp:
        return bool(resp.status == 200)


def ensure_prometheus(port: int = PROMETHEUS_PORT) -> Prometheus:
    with procs.machine_lock("prometheus"):  # pytest workers and parallel runs share one server
        root = state_dir() / "prometheus"
        targets = root / "targets"
        targets.mkdir(parents=True, exist_ok=True)
        if not procs.is_running("prometheus"):
            ensure_packages(("prometheus",))
            binary = shutil.which("prometheus") or "/usr/bin/prometheus"
            config = root / "prometheus.yml"
            config.write_text(yaml.safe_dump(_config(targets)))
            procs.start("prometheus", [binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                                       f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
                                       "--storage.tsdb.retention.time=2h"])
        wait_for(lambda: _ready(port), 60, "Prometheus to become ready",
                 on_timeout=lambda: procs.log_file("prometheus").read_text()[-1500:])
        return Prometheus(url=f"http://127.0.0.1:{port}", targets_dir=targets)


def stop_prometheus() -> None:
    procs.stop("prometheus")
    shutil.rmtree(state_dir() / "prometheus" / "data", ignore_errors=True)
