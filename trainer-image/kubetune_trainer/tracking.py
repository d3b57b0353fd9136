"""Experiment tracking: a run's params, losses, retrieval metrics and artifact URI go to MLflow and/or Weights &
Biases when ``spec.callbacks.mlflow`` / ``spec.callbacks.wandb`` ask, with nothing in the user's code.

Rank 0 logs; the other ranks keep the empty :class:`Tracker` that does nothing. What is logged:

- params at the start (:func:`run_params`), and from the ``started`` event world size, total steps, train pairs,
  device and the resolved precision;
- ``train/loss`` and ``train/lr`` of every optimizer step, buffered and sent when the next event comes (at the
  progress cadence, ``KUBETUNE_PROGRESS_SECONDS``), so a remote server sees one request per cadence, not per step;
- ``train/epoch_loss``, ``val/loss`` and ``epoch`` from each ``metrics`` event, at the epoch's last step;
- ``eval/<metric>`` from each ``evaluation`` event: ``before`` at the first step, each ``epoch`` evaluation at its
  step, ``after`` at the last step (other stages, the WiSE-FT choice, as ``<stage>/<metric>``);
- ``artifact_uri``, ``artifact_sha256`` and ``artifact_size`` from the ``artifact`` event (MLflow tags, W&B
  summary);
- the end: MLflow FINISHED or FAILED, W&B exit code 0 or 1; an attempt that ends retryable (preempted, store
  unreachable) leaves MLflow KILLED and W&B preempting, and the operator's next attempt resumes the same run.

Metric names are the same in both: ``@`` becomes ``_at_`` and any other character MLflow refuses ``_``
(``R@5`` → ``eval/R_at_5``).

A tracking failure never fails training: a backend's first error is one warning line, and that backend is off
for the rest of the attempt. No retry beyond the client's own: MLflow's HTTP client retries each request (here 2
retries, 1 s backoff, 15 s timeout unless the environment says otherwise, instead of 7 retries over ~4 minutes),
and a server still down after that would stall training at every flush. A missing library is a config error at
the start (exit 78): the user asked for tracking.

Every attempt of one FinetuneRun logs to the same tracking run: MLflow finds it by its ``kubetune.run_uid`` tag,
W&B by an id made of the uid. Without a uid (local mode) each attempt starts a new run. W&B in offline mode
writes under ``WANDB_DIR`` (default ``<work dir>/wandb``) and the finished run's directory is copied into the
run's store under ``tracking/wandb/``, where ``wandb sync`` can take it from.

Secrets: W&B reads ``WANDB_API_KEY`` from the environment itself and nothing here prints or logs it; the spec
refuses credentials in an MLflow tracking URI; a warning names the backend and the first line of the error only.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Literal, Protocol

from kubetune.api.spec import CallbacksSpec, FinetuneRunSpec, MlflowSpec, WandbSpec
from kubetune.storage import Store

from .config import ConfigError

log = logging.getLogger("kubetune_trainer")

Outcome = Literal["finished", "failed", "retryable"]

#: What the trainer sets for MLflow's HTTP client when the environment does not (see the module doc).
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
WANDB_PROJECT = "kubetune"
WANDB_STORE_PREFIX = "tracking/wandb"
# MLflow takes at most this many metrics in one request
_MLFLOW_BATCH = 1000
_WARNING_MAX_CHARS = 300


@dataclass(frozen=True)
class RunIdentity:
    """Which FinetuneRun (and attempt) is being tracked."""

    name: str
    namespace: str
    uid: str | None
    attempt: int


@dataclass(frozen=True)
class Point:
    key: str
    value: float
    step: int
    timestamp_ms: int


@dataclass
class Update:
    """What one trainer event adds to a tracking run (:func:`from_event`)."""

    params: dict[str, str] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)


class Backend(Protocol):
    name: str
    where: str  # for the log: the run's URL, or its offline directory

    def params(self, params: Mapping[str, str]) -> None: ...

    def metrics(self, points: Sequence[Point]) -> None: ...

    def tags(self, tags: Mapping[str, str]) -> None: ...

    def finish(self, outcome: Outcome) -> None: ...


# ------------------------------------------------------------------------------------------------ pure pieces
def metric_name(name: str) -> str:
    """``name`` as MLflow accepts it (letters, digits, ``_ - . / :`` and spaces); the same in W&B."""
    return re.sub(r"[^\w.\-/: ]", "_", name.replace("@", "_at_"))


def run_params(spec: FinetuneRunSpec, identity: RunIdentity) -> dict[str, str]:
    """The params a tracking run starts with: the spec's (what the model started from comes with the trainer's
    ``started`` event, as it was resolved). Data URIs are left out: a presigned URL carries a token."""
    training = spec.training
    params: dict[str, Any] = {
        "model": spec.model.name, "epochs": training.epochs,
        "batch_size": training.batch_size, "grad_accumulation": training.grad_accumulation,
        "learning_rate": training.learning_rate, "loss": training.loss, "optimizer": training.optimizer,
        "scheduler": training.scheduler, "warmup_steps": training.warmup_steps,
        "weight_decay": training.weight_decay, "seed": training.seed, "lock_image": training.lock_image,
        "lock_text": training.lock_text, "run_name": identity.name, "run_namespace": identity.namespace,
        "run_uid": identity.uid or "",
    }
    if training.max_steps is not None:
        params["max_steps"] = training.max_steps
    return {key: str(value) for key, value in params.items()}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def from_event(event_type: str, fields: Mapping[str, Any], step: int, now_ms: int) -> Update:
    """What a trainer event (``kubetune.api.events``) adds to a tracking run, at ``step`` unless the event
    names its own. Pure."""
    update = Update()
    at = int(fields["step"]) if isinstance(fields.get("step"), int) else step

    def point(key: str, value: Any) -> None:
        if _finite(value):
            update.points.append(Point(metric_name(key), float(value), at, now_ms))

    if event_type == "started":
        # what the model started from as the trainer resolved it (a name alone means its default tag)
        update.params = {key: str(fields[key]) for key in ("world_size", "total_steps", "train_pairs", "device",
                                                           "precision", "pretrained", "weights_from")
                         if fields.get(key) is not None}
    elif event_type == "progress":
        point("train/samples_per_second", fields.get("samples_per_second"))
    elif event_type == "metrics":
        point("train/epoch_loss", fields.get("train_loss"))
        point("val/loss", fields.get("val_loss"))
        point("epoch", fields.get("epoch"))
    elif event_type == "evaluation":
        stage = str(fields.get("stage") or "eval")
        prefix = "eval" if stage in ("before", "epoch", "after") else stage
        for name, value in (fields.get("metrics") or {}).items():
            point(f"{prefix}/{name}", value)
    elif event_type == "artifact":
        update.tags = {f"artifact_{key}": str(fields[key]) for key in ("uri", "sha256", "size")
                       if fields.get(key) is not None}
    return update


def wandb_mode(mode: str, environ: Mapping[str, str]) -> Literal["online", "offline"]:
    """The W&B mode of spec mode ``mode``: auto is online exactly when an API key is in the environment."""
    if mode == "auto":
        return "online" if environ.get("WANDB_API_KEY") else "offline"
    return "online" if mode == "online" else "offline"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:_WARNING_MAX_CHARS]


# ------------------------------------------------------------------------------------------------ libraries
_LIBRARIES = {"mlflow": ("MLflow tracking", "mlflow"), "wandb": ("W&B tracking", "wandb")}


def require_libraries(callbacks: CallbacksSpec) -> None:
    """Import the tracking libraries the spec asks for: :class:`ConfigError` (permanent) when one is missing."""
    for field_name, (feature, module) in _LIBRARIES.items():
        if getattr(callbacks, field_name) is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"spec.callbacks.{field_name}: {feature} needs {module}, which this trainer cannot "
                              f"import ({first_line(exc)}); install kubetune[tracking] (the kubetune trainer image "
                              f"has it)") from None


# ------------------------------------------------------------------------------------------------ the tracker
_quiet = threading.local()


class _WhileTracking(logging.Filter):
    """Drops the HTTP client's own retry warnings while this thread is inside a tracking call: the one warning
    line of a failing backend says all there is to say."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet, "inside", False)


_FILTER = _WhileTracking()
_QUIETED_LOGGERS = ("urllib3.connectionpool", "urllib3.util.retry")


@contextmanager
def _quiet_clients() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _QUIETED_LOGGERS]
    for logger in loggers:
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    _quiet.inside = True
    try:
        yield
    finally:
        _quiet.inside = False


class Tracker:
    """Sends the trainer's events and per-step losses to the tracking backends, each behind a guard: a backend
    that raises is warned about once and dropped. Without backends every method does nothing.

    ``passthrough``: exceptions the guard lets through, for the trainer's SIGTERM handler, which raises its
    preemption wherever the main thread is, a tracking call included."""

    def __init__(self, passthrough: tuple[type[BaseException], ...] = ()) -> None:
        self._passthrough = passthrough
        self._backends: list[Backend] = []
        self._pending: list[Point] = []
        self._step = 0
        self._closed = False

    @property
    def backends(self) -> list[str]:
        """Each live backend and where its run is."""
        return [f"{b.name} {b.where}" for b in self._backends]

    def add(self, name: str, start: Callable[[], Backend]) -> None:
        with _quiet_clients():
            try:
                self._backends.append(start())
            except self._passthrough:
                raise
            except Exception as exc:
                self._warn(name, "start", exc)

    def train_step(self, step: int, loss: float, lr: float) -> None:
        """One optimizer step's loss and learning rate; sent with the next event."""
        self._step = step
        if self._backends:
            now = _now_ms()
            self._pending += [Point("train/loss", loss, step, now), Point("train/lr", lr, step, now)]

    def params(self, params: Mapping[str, str]) -> None:
        self._each("params", lambda backend: backend.params(params))

    def tags(self, tags: Mapping[str, str]) -> None:
        self._each("tags", lambda backend: backend.tags(tags))

    def event(self, event_type: str, fields: Mapping[str, Any]) -> None:
        """One trainer event (what :meth:`Trainer.emit` emits): flushes the buffered steps, then logs what the
        event adds; ``finished`` closes the run."""
        if not self._backends:
            return
        update = from_event(event_type, fields, self._step, _now_ms())
        if isinstance(fields.get("step"), int):
            self._step = int(fields["step"])
        points, self._pending = [*self._pending, *update.points], []
        if update.params:
            self.params(update.params)
        if points:
            self._each("metrics", lambda backend: backend.metrics(points))
        if update.tags:
            self.tags(update.tags)
        if event_type == "finished":
            self.close("finished")

    def close(self, outcome: Outcome) -> None:
        """End every backend's run (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        points, self._pending = self._pending, []
        if points:
            self._each("metrics", lambda backend: backend.metrics(points))
        self._each("finish", lambda backend: backend.finish(outcome))
        self._backends = []

    def _each(self, what: str, call: Callable[[Backend], None]) -> None:
        with _quiet_clients():
            for backend in list(self._backends):
                try:
                    call(backend)
                except self._passthrough:
                    raise
                except Exception as exc:
                    self._backends.remove(backend)
                    self._warn(backend.name, what, exc)

    @staticmethod
    def _warn(name: str, what: str, exc: BaseException) -> None:
        log.warning("experiment tracking: %s %s failed, nothing more goes to it in this attempt (training goes "
                    "on): %s", name, what, first_line(exc))


def _now_ms() -> int:
    return int(time.time() * 1000)


def start(spec: FinetuneRunSpec, identity: RunIdentity, work_dir: Path, store: Store,
          environ: Mapping[str, str] | None = None, passthrough: tuple[type[BaseException], ...] = ()) -> Tracker:
    """A tracker with a backend for each of ``spec.callbacks.mlflow`` and ``.wandb``, their runs started and the
    params logged. Call on rank 0 only, after :func:`require_libraries`."""
    environ = os.environ if environ is None else environ
    tracker = Tracker(passthrough)
    callbacks = spec.callbacks
    if callbacks.mlflow is not None:
        mlflow_spec = callbacks.mlflow
        tracker.add("MLflow", lambda: _Mlflow(mlflow_spec, identity))
    if callbacks.wandb is not None:
        wandb_spec = callbacks.wandb
        directory = Path(environ.get("WANDB_DIR") or work_dir / "wandb")
        tracker.add("W&B", lambda: _Wandb(wandb_spec, identity, directory, store, wandb_mode(wandb_spec.mode,
                                                                                              environ)))
    if tracker.backends:
        tracker.params(run_params(spec, identity))
        tracker.tags({"kubetune.attempt": str(identity.attempt)})
        log.info("experiment tracking: %s", "; ".join(tracker.backends))
    return tracker


# ------------------------------------------------------------------------------------------------ backends
class _Mlflow:
    """One MLflow run through the tracking client (no global state: the fluent API's active run is left alone)."""

    name = "MLflow"

    def __init__(self, spec: MlflowSpec, identity: RunIdentity) -> None:
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if spec.tracking_uri.startswith("file:"):
            # MLflow 3 refuses its filesystem store (in maintenance upstream) unless asked; the spec asked for it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=spec.tracking_uri)
        experiment = self._experiment(spec.experiment)
        run = self._previous(experiment, identity.uid) if identity.uid else None
        if run is None:
            tags = {"kubetune.run": f"{identity.namespace}/{identity.name}",
                    **({"kubetune.run_uid": identity.uid} if identity.uid else {})}
            run = self._client.create_run(experiment, run_name=spec.run_name or identity.name, tags=tags)
        else:
            self._client.update_run(run.info.run_id, status="RUNNING")
        self.run_id: str = run.info.run_id
        self.where = (f"{spec.tracking_uri.rstrip('/')}/#/experiments/{experiment}/runs/{self.run_id}"
                      if spec.tracking_uri.startswith("http") else f"run {self.run_id} in {spec.tracking_uri}")
        # a resumed run keeps its first attempt's params (MLflow refuses to change one)
        self._logged = dict(run.data.params)

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self._client.create_experiment(name))
        except MlflowException:  # another run created it meanwhile
            found = self._client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def _previous(self, experiment: str, uid: str) -> Any:
        runs = self._client.search_runs([experiment], filter_string=f"tags.`kubetune.run_uid` = '{uid}'",
                                        max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        new = {k: v for k, v in params.items() if k not in self._logged}
        if new:
            self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in new.items()], synchronous=True)
            self._logged.update(new)

    def metrics(self, points: Sequence[Point]) -> None:
        from mlflow.entities import Metric

        for i in range(0, len(points), _MLFLOW_BATCH):
            batch = [Metric(p.key, p.value, p.timestamp_ms, p.step) for p in points[i:i + _MLFLOW_BATCH]]
            self._client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)

    def finish(self, outcome: Outcome) -> None:
        status = {"finished": "FINISHED", "failed": "FAILED", "retryable": "KILLED"}[outcome]
        self._client.set_terminated(self.run_id, status=status)


class _Wandb:
    """One W&B run. Its console capture is off: stdout carries the trainer's events."""

    name = "W&B"

    def __init__(self, spec: WandbSpec, identity: RunIdentity, directory: Path, store: Store,
                 mode: Literal["online", "offline"]) -> None:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self._store = store
        self._offline = mode == "offline"
        self._run = wandb.init(project=spec.project or WANDB_PROJECT, entity=spec.entity,
                               name=spec.run_name or identity.name, id=identity.uid,
                               resume="allow" if identity.uid else None, mode=mode, dir=str(directory),
                               settings=wandb.Settings(console="off", silent=True))
        self._dir = Path(self._run.dir).parent  # <dir>/wandb/<offline-run-…>/files → the run's directory
        self.where = f"offline in {self._dir}" if self._offline else str(self._run.url)
        # W&B drops (and warns about) a step below one it has seen: a resumed attempt starts again from its
        # checkpoint, so the steps it repeats are left out
        self._last_step = int(self._run.step) if self._run.resumed else -1

    def params(self, params: Mapping[str, str]) -> None:
        self._run.config.update(dict(params), allow_val_change=True)

    def metrics(self, points: Sequence[Point]) -> None:
        for step, group in groupby(sorted(points, key=lambda p: p.step), key=lambda p: p.step):
            if step < self._last_step:
                continue
            self._run.log({p.key: p.value for p in group}, step=step)
            self._last_step = step

    def tags(self, tags: Mapping[str, str]) -> None:
        self._run.summary.update(dict(tags))

    def finish(self, outcome: Outcome) -> None:
        if outcome == "retryable":
            self._run.mark_preempting()
        self._run.finish(exit_code=0 if outcome == "finished" else 1)
        if self._offline and outcome != "retryable":
            import wandb

            # finish() only asks the W&B service to close the run's file; its last records (the exit code among
            # them) are on disk once the service has shut down
            wandb.teardown()
            # in a pod the offline directory dies with it; a retryable attempt skips the copy (the store may be
            # what failed) and the next attempt writes its own
            prefix = f"{WANDB_STORE_PREFIX}/{self._dir.name}"
            self._store.put_dir(prefix, self._dir)
            log.info("W&B offline run: %s (`wandb sync` it from a copy)", self._store.uri(prefix))
