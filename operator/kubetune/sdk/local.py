"""Local mode: run the trainer as a subprocess on this machine (CPU or local GPUs), no cluster, no S3.

The trainer (``python -m kubetune_trainer``) is the very program the cluster's pods run; its structured
events on stdout (:mod:`kubetune.api.events`) drive the caller's progress display, exactly as they drive the
operator's status updates on a cluster. A run directory holds everything::

    kubetune-runs/quickstart/
      run.yaml         the FinetuneRun as run (data paths made absolute)
      events.jsonl     every structured event, one JSON object per line
      trainer.log      the trainer's human log
      artifact/        clip-text/, clip-vision/, metrics.json, metadata.json, manifest.json
      checkpoints/     resume state (re-running into the same --output-dir resumes)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api import runfile
from kubetune.api.errors import ConfigInvalid, LocalRunFailed, MissingExtra
from kubetune.api.events import Event, parse_line

DEFAULT_RUNS_DIR = "kubetune-runs"
PROGRESS_SECONDS = "1"


@dataclass
class LocalRun:
    """The outcome of a local run."""

    name: str
    output_dir: Path
    exit_code: int = 0
    events: list[Event] = field(default_factory=list)
    duration_seconds: float = 0.0

    @property
    def artifact(self) -> Path:
        return self.output_dir / "artifact"

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and any(e.type == "finished" for e in self.events)

    def metrics(self) -> dict[str, dict[str, float]]:
        """``{"before": {...}, "after": {...}}`` retrieval metrics, as Finetuner's ``Run.metrics()``."""
        out: dict[str, dict[str, float]] = {"before": {}, "after": {}}
        for event in self.events:
            if event.type == "evaluation" and event.stage in out and event.metrics:
                out[event.stage] = dict(event.metrics)
        if not (out["before"] or out["after"]) and (self.artifact / "metrics.json").is_file():
            saved = json.loads((self.artifact / "metrics.json").read_text())
            out.update({k: v for k, v in saved.items() if k in out})
        return out

    def failure(self) -> Event | None:
        return next((e for e in reversed(self.events) if e.type == "failed"), None)


def pick_output_dir(name: str, runs_dir: str | os.PathLike[str] = DEFAULT_RUNS_DIR) -> Path:
    """``runs_dir/name``, or ``name-2``, ``name-3``... when that already holds a run (never overwrite)."""
    base = Path(runs_dir)
    candidate = base / name
    n = 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base / f"{name}-{n}"
    return candidate


def prepare(run_file: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None,
            name: str | None = None) -> tuple[str, Path, Path]:
    """Validate the run file, pick the run directory and write the resolved ``run.yaml`` there.

    Returns (run name, run directory, path of the written config).
    """
    import yaml

    run = runfile.load(run_file)
    spec = runfile.resolve_local_paths(run.spec, run.base_dir)
    run_name = name or run.name or "local"
    out = Path(output_dir) if output_dir is not None else pick_output_dir(run_name)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = out / "run.yaml"
    doc = runfile.with_spec(run, spec).document(run_name, run.namespace or "default")
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return run_name, out, config


def _check_trainer(python: str) -> None:
    if python != sys.executable:
        return
    import importlib.util

    for module in ("torch", "open_clip"):
        if importlib.util.find_spec(module) is None:
            raise MissingExtra("local mode", "trainer", module)


def run_local(run_file: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None,
              name: str | None = None, on_event: Callable[[Event], None] | None = None,
              on_log: Callable[[str], None] | None = None, python: str | None = None,
              env: dict[str, str] | None = None, gpus: int | None = None) -> LocalRun:
    """Fine-tune locally; blocks until the trainer exits. Raises :class:`LocalRunFailed` when it fails.

    ``on_event`` gets every structured event, ``on_log`` every human log line, as they come. Ctrl-C stops
    the trainer gracefully (it checkpoints; re-running with the same ``output_dir`` resumes).
    """
    python = python or sys.executable
    _check_trainer(python)
    run_name, out, config = prepare(run_file, output_dir, name)
    if gpus is not None:
        _override_gpus(config, gpus)
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("KUBETUNE_PROGRESS_SECONDS", PROGRESS_SECONDS)
    child_env["PYTHONUNBUFFERED"] = "1"
    cmd = [python, "-m", "kubetune_trainer", "--config", str(config), "--output-dir", str(out),
           "--run-name", run_name]
    result = LocalRun(name=run_name, output_dir=out)
    started = time.monotonic()
    log_path = out / "trainer.log"
    tail: deque[str] = deque(maxlen=20)
    with log_path.open("a") as log_file, (out / "events.jsonl").open("a") as events_file:
        lock = threading.Lock()

        def log_line(line: str) -> None:
            with lock:
                log_file.write(line + "\n")
                log_file.flush()
            tail.append(line)
            if on_log is not None:
                on_log(line)

        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                env=child_env)
        assert proc.stdout is not None and proc.stderr is not None
        stderr = proc.stderr
        def pump() -> None:
            for raw in stderr:
                log_line(raw.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                event = parse_line(line)
                if event is None:
                    log_line(line)
                    continue
                result.events.append(event)
                events_file.write(event.model_dump_json(exclude_none=True) + "\n")
                events_file.flush()
                if on_event is not None:
                    on_event(event)
            result.exit_code = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits 75
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            reader.join(timeout=5)
            result.duration_seconds = time.monotonic() - started
    if not result.succeeded:
        failed = result.failure()
        reason = failed.reason if failed and failed.reason else "TrainerError"
        message = failed.message if failed and failed.message else (tail[-1] if tail else "no output")
        if failed is None and result.exit_code != 0 and tail:
            message = " | ".join(list(tail)[-3:])
        raise LocalRunFailed(reason, message, result.exit_code, str(log_path))
    return result


def _override_gpus(config: Path, gpus: int) -> None:
    import yaml

    doc: dict[str, Any] = yaml.safe_load(config.read_text())
    doc["spec"].setdefault("resources", {})["gpus"] = gpus
    runfile.parse_document(doc, str(config))  # still valid
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


__all__ = ["DEFAULT_RUNS_DIR", "ConfigInvalid", "LocalRun", "pick_output_dir", "prepare", "run_local"]
