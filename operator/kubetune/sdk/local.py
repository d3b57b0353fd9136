"""Local mode: run the trainer as a subprocess on this machine (CPU or local GPUs), no cluster, no S3.

The trainer (``python -m kubetune_trainer``) is the very program the cluster's pods run, and its output goes
through the operator's own log → status fold (:class:`kubetune.lifecycle.fold.StatusFolder`) and outcome rules
(:func:`kubetune.lifecycle.outcome.attempt_outcome`), so a local run's status, metrics and artifact read exactly
like a cluster run's: :func:`start_local` returns the same :class:`kubetune.Run`. A run directory holds
everything::

    kubetune-runs/quickstart/
      run.yaml         the FinetuneRun as run (data paths made absolute)
      events.jsonl     every structured event, one JSON object per line
      trainer.log      the trainer's human log
      artifact/        clip-text/, clip-vision/, metrics.json, metadata.json, manifest.json
      checkpoints/     resume state (re-running into the same --output-dir resumes)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from kubetune.api import runfile
from kubetune.api.errors import ConfigInvalid, LocalRunFailed, MissingExtra, RunNotFinished
from kubetune.api.events import MARKER, Event
from kubetune.api.spec import API_VERSION, KIND, TERMINAL_PHASES, Phase
from kubetune.lifecycle.conditions import transition
from kubetune.lifecycle.fold import StatusFolder
from kubetune.lifecycle.formats import now_rfc3339
from kubetune.lifecycle.outcome import attempt_outcome, finish_update
from kubetune.sdk.client import Run

DEFAULT_RUNS_DIR = "kubetune-runs"
PROGRESS_SECONDS = "1"
LOCAL_NAMESPACE = "local"  # what a local run's Run.namespace says (there is no cluster namespace)
STOP_GRACE_SECONDS = 60  # how long a stopped trainer gets to checkpoint before it is killed


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


class LocalTrainer:
    """One trainer subprocess, its output folded into a FinetuneRun status as the operator folds a pod's log.

    ``lines`` keeps every output line in arrival order (human lines and events); ``status()`` is the status a
    cluster run would show. Thread-safe: readers wait on ``changed`` for new lines or the end.
    """

    def __init__(self, name: str, output_dir: Path, config: Path, *, python: str, env: dict[str, str],
                 on_event: Callable[[Event], None] | None = None,
                 on_log: Callable[[str], None] | None = None) -> None:
        self.name, self.output_dir, self.config = name, output_dir, config
        self.cmd = [python, "-m", "kubetune_trainer", "--config", str(config), "--output-dir", str(output_dir),
                    "--run-name", name]
        self.env = env
        self.on_event, self.on_log = on_event, on_log
        self.lines: list[str] = []
        self.events: list[Event] = []
        self.folder = StatusFolder(transition({}, Phase.PENDING.value, "Starting", "Starting the trainer.",
                                              time.time()), tail_lines=30)
        self.exit_code: int | None = None
        self.cancel_requested = False
        self.started_at = time.monotonic()
        self.duration_seconds = 0.0
        self.changed = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._threads: list[threading.Thread] = []

    # -- running
    def start(self) -> LocalTrainer:
        self._proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      bufsize=1, env=self.env)
        assert self._proc.stdout is not None and self._proc.stderr is not None
        events_file = (self.output_dir / "events.jsonl").open("a")
        log_file = (self.output_dir / "trainer.log").open("a")
        readers = [threading.Thread(target=self._pump, args=(stream, log_file, events_file), daemon=True)
                   for stream in (self._proc.stdout, self._proc.stderr)]
        waiter = threading.Thread(target=self._reap, args=(readers, log_file, events_file), daemon=True)
        self._threads = [*readers, waiter]
        for thread in self._threads:
            thread.start()
        return self

    def _pump(self, stream: IO[str], log_file: IO[str], events_file: IO[str]) -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            with self.changed:
                event = self.folder.feed_line(line, time.time())
                self.lines.append(line)
                if event is None:
                    log_file.write(line + "\n")
                    log_file.flush()
                else:
                    self.events.append(event)
                    events_file.write(event.model_dump_json(exclude_none=True) + "\n")
                    events_file.flush()
                    if event.type == "started" and self.folder.status.get("phase") == Phase.PENDING.value:
                        self.folder.update(transition(self.folder.status, Phase.RUNNING.value, "TrainerStarted",
                                                      "The trainer is running.", time.time()))
                self.changed.notify_all()
            # outside the lock: a slow display never holds up the other stream
            if event is None and self.on_log is not None:
                self.on_log(line)
            elif event is not None and self.on_event is not None:
                self.on_event(event)

    def _reap(self, readers: list[threading.Thread], log_file: IO[str], events_file: IO[str]) -> None:
        assert self._proc is not None
        code = self._proc.wait()
        for reader in readers:
            reader.join()
        log_file.close()
        events_file.close()
        with self.changed:
            self.exit_code = code
            self.duration_seconds = time.monotonic() - self.started_at
            now = time.time()
            status = self.folder.status
            if self.cancel_requested and code != 0:
                update = transition(status, Phase.CANCELLED.value, "CancelRequested",
                                    "Cancelled; the checkpoints are kept (re-run into the same directory to "
                                    "resume).", now)
            else:
                from kubetune.api.spec import FinetuneRunStatus

                outcome = attempt_outcome(exit_code=code, failed_event=self.folder.last_failed, retries=0,
                                          backoff_limit=0)
                update = finish_update(outcome, FinetuneRunStatus.model_validate(status), now)
            self.folder.update(update)
            self.changed.notify_all()

    @property
    def phase(self) -> str:
        return str(self.folder.status.get("phase"))

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL_PHASES

    def status(self) -> dict[str, Any]:
        """The run's status (camelCase, as a FinetuneRun's ``status``)."""
        with self.changed:
            self.folder.take_patch()  # brings logTail up to date
            return dict(self.folder.status)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the trainer has exited and its outcome is judged; False on timeout."""
        with self.changed:
            return self.changed.wait_for(lambda: self.done, timeout)

    def cancel(self) -> None:
        """SIGTERM: the trainer checkpoints and exits (75); killed after ``STOP_GRACE_SECONDS``."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with self.changed:
            self.cancel_requested = True
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()

    def follow(self, include_events: bool = False, timeout: float | None = None) -> Iterator[str]:
        """Every output line from the first, then new ones as they come, until the run ends."""
        deadline = None if timeout is None else time.monotonic() + timeout
        index = 0
        while True:
            with self.changed:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self.changed.wait_for(lambda seen=index: len(self.lines) > seen or self.done, left)  # type: ignore[misc]
                batch, index = self.lines[index:], len(self.lines)
                ended = self.done
            for line in batch:
                if include_events or not line.startswith(MARKER):
                    yield line
            if ended or (deadline is not None and time.monotonic() >= deadline):
                return

    def log_text(self, include_events: bool = False) -> str:
        with self.changed:
            lines = list(self.lines)
        return "\n".join(line for line in lines if include_events or not line.startswith(MARKER))

    def failure(self) -> LocalRunFailed:
        """The run's failure as the typed error the SDK raises."""
        failed = self.folder.last_failed
        reason = failed.reason if failed and failed.reason else "TrainerError"
        message = failed.message if failed and failed.message else None
        if message is None:
            human = [line for line in self.lines if not line.startswith(MARKER)]
            message = " | ".join(human[-3:]) if human else "no output"
        return LocalRunFailed(reason, message, self.exit_code if self.exit_code is not None else -1,
                              str(self.output_dir / "trainer.log"))


class LocalRun(Run):
    """A :class:`kubetune.Run` whose trainer is a process on this machine: the same verbs (``status``, ``logs``,
    ``stream_logs``, ``metrics``, ``wait``, ``cancel``, ``save_artifact``), plus the run directory."""

    def __init__(self, trainer: LocalTrainer, spec: dict[str, Any]) -> None:
        obj = {"apiVersion": API_VERSION, "kind": KIND,
               "metadata": {"name": trainer.name, "namespace": LOCAL_NAMESPACE,
                            "creationTimestamp": now_rfc3339(time.time())},
               "spec": spec, "status": trainer.status()}
        super().__init__(None, obj)
        self.trainer = trainer

    def __repr__(self) -> str:
        return f"LocalRun({self.name}, {self.output_dir}, phase={self.phase})"

    @property
    def output_dir(self) -> Path:
        return self.trainer.output_dir

    @property
    def artifact(self) -> Path:
        return self.trainer.output_dir / "artifact"

    @property
    def events(self) -> list[Event]:
        return list(self.trainer.events)

    @property
    def exit_code(self) -> int | None:
        return self.trainer.exit_code

    @property
    def duration_seconds(self) -> float:
        return self.trainer.duration_seconds

    @property
    def succeeded(self) -> bool:
        return self.trainer.phase == Phase.SUCCEEDED.value

    def refresh(self) -> LocalRun:
        self._obj["status"] = self.trainer.status()
        return self

    def logs(self, include_events: bool = False) -> str:
        return self.trainer.log_text(include_events)

    def stream_logs(self, poll: float = 2.0, timeout: float | None = None, include_events: bool = False,
                    interval: float | None = None) -> Iterator[str]:
        return self.trainer.follow(include_events, timeout)

    def wait(self, timeout: float | None = None, poll: float = 2.0, raise_on_failure: bool = True) -> Any:
        if not self.trainer.wait(timeout):
            raise RunNotFinished(self.name, self.trainer.phase)
        if raise_on_failure and not self.succeeded:
            raise self.trainer.failure()
        return self.status()

    def cancel(self, delete: bool = False) -> str:
        if self.trainer.done:
            return f"already {self.trainer.phase}"
        self.trainer.cancel()
        self.trainer.wait(STOP_GRACE_SECONDS)
        return "cancelled (the trainer checkpointed; re-run into the same directory to resume)"


def start_trainer(run_file: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None,
                  name: str | None = None, on_event: Callable[[Event], None] | None = None,
                  on_log: Callable[[str], None] | None = None, python: str | None = None,
                  env: dict[str, str] | None = None, gpus: int | None = None) -> LocalTrainer:
    """Validate the run file, write the run directory and start the trainer; returns at once."""
    python = python or sys.executable
    _check_trainer(python)
    run_name, out, config = prepare(run_file, output_dir, name)
    if gpus is not None:
        _override_gpus(config, gpus)
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("KUBETUNE_PROGRESS_SECONDS", PROGRESS_SECONDS)
    child_env["PYTHONUNBUFFERED"] = "1"
    return LocalTrainer(run_name, out, config, python=python, env=child_env, on_event=on_event,
                        on_log=on_log).start()


def start_local(run_file: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None,
                name: str | None = None, on_event: Callable[[Event], None] | None = None,
                on_log: Callable[[str], None] | None = None, python: str | None = None,
                env: dict[str, str] | None = None, gpus: int | None = None) -> LocalRun:
    """Start a local fine-tune and return its :class:`LocalRun` at once (``run.wait()`` blocks)."""
    import yaml

    trainer = start_trainer(run_file, output_dir, name, on_event, on_log, python, env, gpus)
    spec = (yaml.safe_load(trainer.config.read_text()) or {}).get("spec") or {}
    return LocalRun(trainer, spec)


def run_local(run_file: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None,
              name: str | None = None, on_event: Callable[[Event], None] | None = None,
              on_log: Callable[[str], None] | None = None, python: str | None = None,
              env: dict[str, str] | None = None, gpus: int | None = None) -> LocalRun:
    """Fine-tune locally; blocks until the trainer exits. Raises :class:`LocalRunFailed` when it fails.

    ``on_event`` gets every structured event, ``on_log`` every human log line, as they come. Ctrl-C stops
    the trainer gracefully (it checkpoints; re-running with the same ``output_dir`` resumes).
    """
    run = start_local(run_file, output_dir, name, on_event, on_log, python, env, gpus)
    try:
        run.trainer.wait()
    except KeyboardInterrupt:
        run.trainer.cancel()
        raise
    if not run.succeeded:
        raise run.trainer.failure()
    return run.refresh()


def _override_gpus(config: Path, gpus: int) -> None:
    import yaml

    doc: dict[str, Any] = yaml.safe_load(config.read_text())
    doc["spec"].setdefault("resources", {})["gpus"] = gpus
    runfile.parse_document(doc, str(config))  # still valid
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


__all__ = ["DEFAULT_RUNS_DIR", "ConfigInvalid", "LocalRun", "LocalTrainer", "pick_output_dir", "prepare", "run_local",
           "start_local", "start_trainer"]
