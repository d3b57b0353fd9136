"""One fine-tuning run, start to finish: data, model, (resume), evaluate, train, evaluate, artifact.

Everything that talks to the outside goes through the run's :class:`kubetune.storage.Store` and the
:class:`~kubetune_trainer.events.Emitter`; the stages themselves live in :mod:`loop`, :mod:`evaluate`,
:mod:`callbacks`, :mod:`checkpoint` and :mod:`export`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from kubetune.api.events import RETRYABLE_EXIT_CODES
from kubetune.api.spec import FinetuneRunSpec
from kubetune.storage import ARTIFACT, RetryPolicy, Store, run_store, store_from_uri
from torch import nn

from . import checkpoint, determinism, distributed, evaluate, export, loop, shards, tracking
from . import model as model_lib
from .cache import shared_dir
from .callbacks import Monitor, SweepPoint, choose_alpha, wise_ft
from .config import ConfigError, RunConfig
from .data import (
    BadRows,
    DataError,
    Datasets,
    Fetcher,
    ImageRef,
    PairSet,
    detect_format,
    disk_cache_bytes,
    load_datasets,
    over_limit,
)
from .events import Emitter
from .failures import classify
from .sampling import (
    UNUSABLE,
    EpochBatchSampler,
    ImageDataset,
    PairDataset,
    batches_per_epoch,
    make_loader,
    tokenize,
)

log = logging.getLogger("kubetune_trainer")


class Preempted(Exception):
    """SIGTERM (eviction, preemption, suspend): checkpointed if possible; retryable."""


class NotEnoughData(Exception):
    pass


class CheckpointMissing(Exception):
    """The operator says this run has a checkpoint (KUBETUNE_RESUME_FROM), but its store has none: the store
    lost it or spec.output now points elsewhere. Permanent: training from scratch would silently redo (and
    overwrite) what the run already did."""


@dataclass
class StopFlag:
    """Set by the SIGTERM handler; the training loop polls it at step boundaries."""

    requested: bool = False
    in_loop: bool = False


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based)
    batch_in_epoch: int = 0  # loader batches of this epoch already trained on
    loss_sum: float = 0.0
    loss_count: int = 0
    before: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_metrics: list[dict[str, Any]] = field(default_factory=list)  # retrieval evaluated at epoch ends
    monitors: dict[str, dict[str, Any]] = field(default_factory=dict)
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Result:
    artifact_uri: str
    sha256: str
    size: int
    metrics: dict[str, Any]  # before, after (name → value); epochs (per-epoch evaluations), wise_ft (the sweep)
    steps: int
    resumed_from_step: int | None


def fetch_weights(uri: str, fetcher: Fetcher, spec: FinetuneRunSpec, work_dir: Path) -> Path:
    """Make ``spec.model.weights`` local: a state-dict file or an artifact directory."""
    if not uri.startswith(("s3://", "http://", "https://")):
        path = Path(uri.removeprefix("file://"))
        if not path.exists():
            raise model_lib.ModelError(f"spec.model.weights: {path} does not exist")
        return path
    if Path(uri.split("?")[0]).suffix in model_lib.WEIGHT_SUFFIXES:
        try:
            return fetcher.local_path(uri)
        except FileNotFoundError:
            raise model_lib.ModelError(f"spec.model.weights: {uri} does not exist") from None
    if not uri.startswith("s3://"):
        raise model_lib.ModelError("spec.model.weights: an http(s) URL must name a weights file")
    source = store_from_uri(uri, endpoint=spec.output.endpoint, region=spec.output.region,
                            retry=RetryPolicy.for_window(spec.output.retry_seconds))
    # once per pod: its DDP ranks share work_dir
    weights = shared_dir(work_dir / "weights", uri, lambda into: bool(source.get_dir("", into)))
    if weights is None:
        raise model_lib.ModelError(f"spec.model.weights: nothing under {uri}")
    return weights


class Trainer:
    def __init__(self, cfg: RunConfig, emitter: Emitter, stop: StopFlag | None = None,
                 store: Store | None = None) -> None:
        self.cfg = cfg
        self.spec = cfg.spec
        self.emitter = emitter
        self.stop = stop or StopFlag()
        self.dist = distributed.from_env()
        self.device = distributed.pick_device(self.dist, want_gpu=self.spec.resources.gpus > 0)
        self.precision = model_lib.resolve_precision(self.spec.training.precision, self.device)
        self.work = cfg.work_dir / (f"rank{self.dist.rank}" if self.dist.distributed else "")
        self.work.mkdir(parents=True, exist_ok=True)
        self.store = store or run_store(self.spec.output, cfg.namespace, cfg.name, cfg.output_dir, uid=cfg.uid)
        self.fetcher = Fetcher(cfg.work_dir / "cache", self.spec.output, max_bytes=disk_cache_bytes(self.spec))
        self.phases = distributed.SoloPhases(self.dist)  # replaced by one with its own timeout once data is known
        self.started_at = time.time()
        self.tracker = tracking.Tracker()  # rank 0 gets one with backends in run(); the others keep this no-op

    # ---------------------------------------------------------------------------------------------- events
    def emit(self, event_type: Any, **fields: Any) -> None:
        if self.dist.is_main:
            self.emitter.emit(event_type, **fields)
            self.tracker.event(event_type, fields)

    def info(self, message: str, *args: Any) -> None:
        if self.dist.is_main:
            log.info(message, *args)

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> Result:
        """The run, tracked when the spec asks (see :mod:`tracking`): its tracking runs end finished, failed, or
        left for the next attempt when this one ends retryable."""
        tracking.require_libraries(self.spec.callbacks)
        if self.dist.is_main:
            identity = tracking.RunIdentity(self.cfg.name, self.cfg.namespace, self.cfg.env.run_uid,
                                            self.cfg.env.attempt)
            self.tracker = tracking.start(self.spec, identity, self.cfg.work_dir, self.store, passthrough=(Preempted,))
        try:
            result = self._run()
        except BaseException as exc:
            self.tracker.close("retryable" if classify(exc)[1] in RETRYABLE_EXIT_CODES else "failed")
            raise
        self.tracker.close("finished")
        return result

    def _run(self) -> Result:
        distributed.init(self.dist, self.device, self.spec.training.collective_timeout_seconds)
        self.store.check()  # a wrong bucket fails now, not at the first checkpoint
        finished = checkpoint.latest_info(self.store)
        if finished and finished.get("finished") and self.store.exists(f"{ARTIFACT}/manifest.json"):
            return self._already_finished(finished)
        self._check_resume_point(finished)
        spec = self.spec
        wise = spec.callbacks.wise_ft
        if wise is not None and wise.sweep is not None and wise.metric not in evaluate.higher_is_better():
            raise ConfigError(f"spec.callbacks.wiseFt.metric: {wise.metric!r} is not a retrieval metric where higher "
                              f"is better; one of {', '.join(sorted(evaluate.higher_is_better()))}")
        torch.manual_seed(spec.training.seed)
        weights = None
        if spec.model.weights:
            weights = fetch_weights(spec.model.weights, self.fetcher, spec, self.cfg.work_dir)
        bundle = model_lib.build(spec.model, self.device, self.precision, self.cfg.work_dir, weights,
                                 mirror=model_lib.mirror_store(self.cfg.env.model_mirror, spec.output))
        model = bundle.model
        if spec.training.loss == "SigLIPLoss" and model_lib.add_sigmoid_bias(model):
            self.info("SigLIP loss on a model without a logit bias: logit scale ln %g, bias %g (the SigLIP paper's "
                      "initialisation)", math.exp(model_lib.SIGLIP_INIT_LOGIT_SCALE), model_lib.SIGLIP_INIT_LOGIT_BIAS)
        start_weights = ({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                         if spec.callbacks.wise_ft else None)
        data = load_datasets(spec.data, self.fetcher, spec.training.seed, on_progress=self.info)
        micro = spec.training.batch_size
        accum = spec.training.grad_accumulation
        workers = spec.training.num_workers
        stream: shards.ShardStream | None = None
        if detect_format(spec.data.train, spec.data.format) == "webdataset":
            shard_set = shards.resolve_shards(spec.data.train, self.fetcher)
            # whole optimizer steps only: a rank never reads (or meets a bad row in) a batch it will not train
            per_epoch_batches = shards.agreed_batches(shard_set, micro, self.dist.world_size, workers) // accum * accum
            stream = shards.ShardStream(
                shards.assign(shard_set.shards, self.dist.world_size, workers)[self.dist.rank], micro,
                per_epoch_batches, bundle.preprocess_train, bundle.tokenizer, spec.training.seed,
                spec.data.shuffle_buffer, self.fetcher, self.dist.rank, spec.data.skip_bad_rows)
            train_pairs = shard_set.pairs
            sampler: EpochBatchSampler | shards.ShardStream = stream
            loader: Iterable[Any] = _Unchecked(shards.StreamLoader(stream, workers, self.device.type == "cuda"))
            self.info("train: %d pairs (%d images) in %d shards, streamed", shard_set.pairs, shard_set.images,
                      len(shard_set.shards))
        else:
            train_set = PairDataset(data.train.pairs, bundle.preprocess_train, bundle.tokenizer,
                                    seed=spec.training.seed)
            train_pairs = len(train_set)
            per_epoch_batches = batches_per_epoch(len(train_set), micro, self.dist.world_size) // accum * accum
            sampler = EpochBatchSampler(len(train_set), micro, spec.training.seed, self.dist.rank,
                                        self.dist.world_size, with_epoch=True, batches=per_epoch_batches)
            loader = make_loader(train_set, workers, self.device.type == "cuda", batch_sampler=sampler,
                                 generator=torch.Generator().manual_seed(spec.training.seed))
        self.info("data: %s", ", ".join(f"{s.name}={len(s)}" for s in
                                        (data.train, data.val, data.query, data.index, data.reference)
                                        if s is not None and (s is not data.train or stream is None)))
        eval_items = sum(len(s) for s in (data.val, data.query, data.index, data.reference) if s is not None)
        self.phases = distributed.SoloPhases.create(self.dist, distributed.solo_phase_seconds(
            spec.training.collective_timeout_seconds, spec.output.retry_seconds, eval_items))
        if spec.training.lock_image:
            model.lock_image_tower()  # type: ignore[operator]
        if spec.training.lock_text:
            model.lock_text_tower()  # type: ignore[operator]
        steps_per_epoch = per_epoch_batches // accum
        if steps_per_epoch < 1:
            raise NotEnoughData(f"the train set has {train_pairs} usable pairs, fewer than batchSize × "
                                f"gradAccumulation × processes = {micro * accum * self.dist.world_size}"
                                + (" on each process's shards" if stream is not None else ""))
        total_steps = spec.training.epochs * steps_per_epoch
        if spec.training.max_steps:
            total_steps = min(total_steps, spec.training.max_steps)

        train_model: nn.Module = model
        if self.dist.distributed:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        groups = loop.param_groups(model, spec.training.weight_decay)
        master = loop.master_weights(self.precision, groups)
        optimizer = loop.make_optimizer(spec.training.optimizer, master.groups if master else groups,
                                        spec.training.learning_rate)
        scaler = loop.grad_scaler(self.precision, self.device)
        loss_fn = loop.make_loss(spec.training.loss, self.dist.rank, self.dist.world_size)
        eval_loss_fn = loop.make_loss(spec.training.loss)

        state = LoopState()
        resumed = checkpoint.load_latest(self.store, self.work)
        resumed_from = None
        rng_state: dict[str, Any] | None = None
        if resumed is not None:
            info, saved = resumed
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if scaler is not None and saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            if master is not None:
                master.load_state_dict(saved.get("master") or [p.detach() for p, _ in master.pairs])
            rng_state = saved.get("rng")
            state = LoopState(**saved["loop"])
            resumed_from = state.step
            self.info("resuming from %s (step %d, epoch %d)", info["key"], state.step, state.epoch + 1)
            expected = self.cfg.env.resume_from
            if expected is not None and expected != self.store.uri(str(info["key"])):
                # the operator learns of checkpoints from the log, so it may lag behind latest.json
                self.info("the operator last saw checkpoint %s; the store's latest is newer or different", expected)
        monitors = self._monitors(state)

        self.emit("started", run=self.cfg.name, namespace=self.cfg.namespace, model=bundle.name,
                  pretrained=bundle.start.get("pretrained"), weights_from=model_lib.weights_source(bundle.start),
                  epochs=spec.training.epochs, total_steps=total_steps, step=state.step,
                  world_size=self.dist.world_size, attempt=self.cfg.env.attempt,
                  resumed_from_step=resumed_from, device=str(self.device.type), precision=self.precision,
                  train_pairs=train_pairs, skipped_rows=data.skipped() or None)
        evaluator = _Evaluator(self, bundle, data)
        if not state.before and evaluator.enabled and spec.callbacks.evaluation.enabled:
            state.before = self.phases.run(lambda: evaluator.retrieval(model, "before", 0)) or {}

        # ------------------------------------------------------------------------------------ epochs
        bad_rows = BadRows("train", spec.data.skip_bad_rows, spec.data.bad_row_limit)
        progress = _Progress(self, total_steps, micro * accum * self.dist.world_size,
                             lambda: data.train.skipped + bad_rows.bad + (stream.bad_samples if stream else 0))
        save = _Saver(self, model, optimizer, scaler, master)
        if rng_state is not None:  # after the evaluation above, which a resumed attempt skips
            determinism.set_rng_state(rng_state)
        started_at = (state.step, state.epoch)
        self.stop.in_loop = True
        train_model.train()
        # an epoch whose last step was trained but whose end (validation, history, best model) was not recorded
        # has batch_in_epoch > 0 with every step done: it still runs, trains nothing and records the end
        while state.epoch < spec.training.epochs and not state.stopped_early and (
                state.step < total_steps or state.batch_in_epoch > 0):
            epoch = state.epoch
            sampler.set_epoch(epoch, state.batch_in_epoch)
            group: list[loop.Batch] = []
            data_error: DataError | None = None
            for images, texts, bad, reasons in loader if state.step < total_steps else ():
                if isinstance(reasons, DataError):  # the stream's reader stopped on a bad sample
                    data_error = reasons
                elif stream is None:
                    data_error = bad_rows.record_batch(bad.tolist(), reasons, UNUSABLE)
                    group.append((images, texts))
                else:
                    group.append((images, texts))
                    if spec.data.skip_bad_rows:  # the stream skips bad samples itself and counts them
                        data_error = over_limit("train", stream.bad_samples, stream.read_samples,
                                                spec.data.bad_row_limit, [])
                if len(group) < accum and data_error is None:
                    continue
                # before the step's own collectives, so that every rank stops together, the one that met the
                # row naming it, even the one whose reader has no batch left to train
                if distributed.any_true(data_error is not None, self.dist, self.device):
                    raise data_error or DataError("train", None, "another process met a bad row (its log names it)")
                lr = loop.lr_at(state.step, spec.training.learning_rate, spec.training.warmup_steps, total_steps,
                                spec.training.scheduler)
                loop.set_lr(optimizer, lr)
                loss = loop.train_step(train_model, loss_fn, optimizer, group, self.device, self.precision,
                                       scaler, spec.training.grad_clip_norm, master)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the training loss is {loss} at step {state.step + 1}")
                group = []
                state.step += 1
                state.batch_in_epoch += accum
                state.loss_sum += loss
                state.loss_count += 1
                progress.step(state, loss, lr)
                every = spec.run_policy.checkpoint_every_steps
                if every and state.step % every == 0 and state.step < total_steps:
                    save(state)
                if distributed.any_true(self.stop.requested, self.dist, self.device):
                    save(state)
                    raise Preempted(f"SIGTERM at step {state.step}: checkpointed")
                if state.step >= total_steps:
                    break
            self._end_epoch(model, evaluator, eval_loss_fn, monitors, state, epoch)
            state.epoch += 1
            state.batch_in_epoch, state.loss_sum, state.loss_count = 0, 0.0, 0
            every_epochs = spec.run_policy.checkpoint_every_epochs
            if every_epochs and state.epoch % every_epochs == 0 and state.step < total_steps and (
                    state.epoch < spec.training.epochs and not state.stopped_early):
                save(state)
        self.stop.in_loop = False
        if self.stop.requested:
            raise Preempted("SIGTERM after training")
        if (state.step, state.epoch) != started_at:
            # the final evaluation and the export can take long: a SIGTERM there resumes from here, not from the
            # last periodic checkpoint (which may be a whole epoch back)
            save(state)

        # ------------------------------------------------------------------------------------ finish
        if spec.callbacks.best_model is not None and "best_model" in monitors and \
                self.store.exists(checkpoint.BEST):
            best = monitors["best_model"]
            self.info("best model: epoch %s (%s = %.5g)", best.best_epoch, best.metric, best.best or math.nan)
            model.load_state_dict(checkpoint.load_weights(self.store, self.work, checkpoint.BEST))
        if wise is not None and wise.sweep is None and start_weights is not None:
            model.load_state_dict(wise_ft(start_weights, model.state_dict(), wise.alpha))
            self.info("WiSE-FT: interpolated with the starting weights, alpha=%.3f", wise.alpha)

        def finish() -> Result:
            sweep = None
            if wise is not None and wise.sweep is not None and start_weights is not None:
                sweep = self._wise_ft_sweep(model, evaluator, start_weights, state.epoch)
            after = evaluator.retrieval(model, "after", state.epoch) if (
                evaluator.enabled and spec.callbacks.evaluation.enabled) else {}
            return self._export(model, bundle, state, after, resumed_from, sweep)

        result = self.phases.run(finish)
        return result if result is not None else Result("", "", 0, {}, state.step, resumed_from)

    # ---------------------------------------------------------------------------------------------- pieces
    def _check_resume_point(self, latest: dict[str, Any] | None) -> None:
        """Fail before any work when the operator expects a checkpoint the store does not have."""
        expected = self.cfg.env.resume_from
        if expected is None:
            return
        key = latest.get("key") if latest else None
        if not key or not self.store.exists(str(key)):
            where = f"{checkpoint.LATEST} names {key}, which is missing" if key else f"it has no {checkpoint.LATEST}"
            raise CheckpointMissing(f"this run resumes from {expected} (KUBETUNE_RESUME_FROM), but its store "
                                    f"{self.store.uri()} has no checkpoint ({where}): the checkpoints were lost or "
                                    f"spec.output points at another store, and training from scratch would "
                                    f"overwrite the run's progress")

    def _monitors(self, state: LoopState) -> dict[str, Monitor]:
        monitors = {}
        callbacks = self.spec.callbacks
        if callbacks.best_model is not None:
            monitors["best_model"] = Monitor(callbacks.best_model.monitor, callbacks.best_model.mode)
        if callbacks.early_stopping is not None:
            es = callbacks.early_stopping
            monitors["early_stopping"] = Monitor(es.monitor, es.mode, es.min_delta)
        for name, monitor in monitors.items():
            if name in state.monitors:
                monitor.load_state_dict(state.monitors[name])
        return monitors

    def _end_epoch(self, model: nn.Module, evaluator: _Evaluator, eval_loss_fn: nn.Module,
                   monitors: dict[str, Monitor], state: LoopState, epoch: int) -> None:
        spec = self.spec
        metrics: dict[str, float] = {}
        if state.loss_count:
            metrics["train_loss"] = state.loss_sum / state.loss_count

        def evaluate_on_main() -> None:
            if evaluator.val is not None:
                metrics["val_loss"] = evaluator.val_loss(model, eval_loss_fn)
            every = spec.callbacks.evaluation.every_epochs
            needs_retrieval = any(m.metric not in ("train_loss", "val_loss") for m in monitors.values())
            last = epoch + 1 == spec.training.epochs
            if evaluator.enabled and spec.callbacks.evaluation.enabled and not last and (
                    (every and (epoch + 1) % every == 0) or needs_retrieval):
                retrieval = evaluator.retrieval(model, "epoch", epoch + 1)
                state.epoch_metrics.append({"epoch": epoch + 1, "step": state.step, **retrieval})
                metrics.update(retrieval)
            self.emit("metrics", stage="val" if "val_loss" in metrics else "train", epoch=epoch + 1,
                      step=state.step, train_loss=metrics.get("train_loss"), val_loss=metrics.get("val_loss"))
            self.info("epoch %d/%d: %s", epoch + 1, spec.training.epochs,
                      ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in ("train_loss", "val_loss")))

        self.phases.run(evaluate_on_main)
        state.history.append({"epoch": epoch + 1, "step": state.step, **{
            k: v for k, v in metrics.items() if k in ("train_loss", "val_loss")}})
        best = monitors.get("best_model")
        improved = best is not None and best.update(metrics, epoch + 1)

        def save_best() -> None:
            if improved:
                checkpoint.save_weights(self.store, self.work, checkpoint.BEST,
                                        {k: v.detach().cpu() for k, v in model.state_dict().items()})

        if best is not None:  # a phase on every rank, whether or not this rank saw the improvement
            self.phases.run(save_best)
        early = monitors.get("early_stopping")
        stop = False
        if early is not None and early.update(metrics, epoch + 1) is False:
            stop = early.bad_epochs >= self.spec.callbacks.early_stopping.patience  # type: ignore[union-attr]
        state.stopped_early = distributed.any_true(stop, self.dist, self.device)
        if state.stopped_early:
            self.info("early stopping after epoch %d (%s did not improve for %d epochs)", epoch + 1,
                      early.metric if early else "?", early.bad_epochs if early else 0)
        state.monitors = {name: m.state_dict() for name, m in monitors.items()}

    def _wise_ft_sweep(self, model: nn.Module, evaluator: _Evaluator, start: dict[str, torch.Tensor],
                       epoch: int) -> dict[str, Any]:
        """Evaluate the WiSE-FT α of the spec (and 0) on the target and the reference set, leave the model at the
        α the rule chooses, and return the frontier."""
        wise = self.spec.callbacks.wise_ft
        assert wise is not None and wise.sweep is not None
        tuned = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        points = []
        for alpha in sorted({0.0, *wise.sweep}):
            model.load_state_dict(wise_ft(start, tuned, alpha))
            on_target = evaluator.retrieval(model, "wise_ft", epoch, emit=False)
            target = on_target[wise.metric]
            reference = (evaluator.retrieval(model, "wise_ft", epoch, on=evaluator.reference, emit=False)[wise.metric]
                         if evaluator.reference is not None else None)
            points.append(SweepPoint(alpha, target, reference, on_target.get("zero_shot_top1")))
            self.info("WiSE-FT alpha %.3f: target %s %.4f%s", alpha, wise.metric, target,
                      f", reference {reference:.4f}" if reference is not None else "")
        chosen = choose_alpha(points, wise.keep_reference)
        model.load_state_dict(wise_ft(start, tuned, chosen.alpha))
        summary = {"metric": wise.metric, "keep_reference": wise.keep_reference, "alpha": chosen.alpha,
                   "frontier": [dataclasses.asdict(p) for p in points]}
        chosen_metrics = {"alpha": chosen.alpha, "target": chosen.target}
        if chosen.reference is not None:
            chosen_metrics["reference"] = chosen.reference
        self.emit("evaluation", stage="wise_ft", epoch=epoch, metrics=chosen_metrics, **summary)
        rule = (f"the highest target keeping {wise.keep_reference:.0%} of the reference"
                if chosen.reference is not None else "the highest target")
        self.info("WiSE-FT: alpha %.3f chosen (%s)", chosen.alpha, rule)
        return summary

    def _export(self, model: nn.Module, bundle: model_lib.ModelBundle, state: LoopState, after: dict[str, float],
                resumed_from: int | None, sweep: dict[str, Any] | None = None) -> Result:
        metrics: dict[str, Any] = {"before": state.before, "after": after}
        if state.epoch_metrics:
            metrics["epochs"] = state.epoch_metrics
        if sweep is not None:
            metrics["wise_ft"] = sweep
        if not self.dist.is_main:
            return Result("", "", 0, metrics, state.step, resumed_from)
        root = self.work / "artifact"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        import open_clip

        metadata = {
            "run": {"name": self.cfg.name, "namespace": self.cfg.namespace},
            "spec": self.spec.dump(),
            "start": bundle.start,  # the pretrained tag actually used and where its weights came from
            "training": {"steps": state.step, "epochs_completed": state.epoch, "stopped_early": state.stopped_early,
                         "resumed_from_step": resumed_from, "history": state.history,
                         "world_size": self.dist.world_size, "precision": self.precision,
                         "device": self.device.type},
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        sha, size, files = export.write_artifact(root, model, bundle.name, bundle.config, bundle.preprocess_cfg,
                                                 metrics, metadata, onnx=self.spec.export.onnx,
                                                 context_length=bundle.context_length, tokenizer=bundle.tokenizer)
        for stale in self.store.list(ARTIFACT):
            self.store.delete(stale)
        # everything but the manifest first: a present manifest.json means a complete artifact
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"):
            self.store.put_file(f"{ARTIFACT}/{path.relative_to(root).as_posix()}", path)
        self.store.put_file(f"{ARTIFACT}/manifest.json", root / "manifest.json")
        uri = self.store.uri(ARTIFACT)
        self.emit("artifact", uri=uri, size=size, sha256=sha, files=files)
        checkpoint.mark_finished(self.store, {"artifact": uri, "sha256": sha, "size": size, "files": files,
                                              "metrics": metrics})
        self.emit("finished", artifact_uri=uri, duration_seconds=round(time.time() - self.started_at, 3),
                  step=state.step, metrics=None)
        self.info("artifact: %s (%d files, %d bytes, manifest sha256 %s)", uri, files, size, sha)
        return Result(uri, sha, size, metrics, state.step, resumed_from)

    def _already_finished(self, info: dict[str, Any]) -> Result:
        uri = str(info.get("artifact", self.store.uri(ARTIFACT)))
        self.info("run already finished; artifact at %s", uri)
        self.emit("artifact", uri=uri, size=info.get("size"), sha256=info.get("sha256"), files=info.get("files"))
        self.emit("finished", artifact_uri=uri, duration_seconds=round(time.time() - self.started_at, 3))
        return Result(uri, str(info.get("sha256", "")), int(info.get("size", 0)), info.get("metrics", {}),
                      int(info.get("step", 0)), None)


@dataclass
class _Saver:
    """Writes a checkpoint of everything a resumed attempt needs to continue exactly where this one stopped."""

    trainer: Trainer
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    master: loop.MasterWeights | None

    def __call__(self, state: LoopState) -> None:
        self.trainer.phases.run(lambda: self._save(state))

    def _save(self, state: LoopState) -> None:
        trainer = self.trainer
        payload = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                   "master": self.master.state_dict() if self.master is not None else [],
                   "rng": determinism.rng_state(), "loop": state.to_dict()}
        uri = checkpoint.save(trainer.store, trainer.work, payload, state.step, state.epoch)
        epoch = min(state.epoch + 1, trainer.spec.training.epochs)  # the final checkpoint is past the last epoch
        trainer.emit("checkpoint", uri=uri, step=state.step, epoch=epoch)
        trainer.info("checkpoint: %s", uri)


@dataclass(frozen=True)
class _Unchecked:
    """A stream's batches, each epoch, in the shape of :class:`PairDataset`'s (the stream counts bad samples);
    a bad sample that stops the stream comes last, as ``(None, None, None, error)``."""

    batches: Iterable[loop.Batch]

    def __iter__(self) -> Iterator[tuple[Any, Any, None, DataError | None]]:
        try:
            for images, texts in self.batches:
                yield images, texts, None, None
        except DataError as exc:
            yield None, None, None, exc


class _Progress:
    """Throttled progress events with samples/s over the last window and an ETA."""

    def __init__(self, trainer: Trainer, total_steps: int, samples_per_step: int,
                 skipped_rows: Callable[[], int]) -> None:
        self.trainer = trainer
        self.skipped_rows = skipped_rows
        self.total = total_steps
        self.samples_per_step = samples_per_step
        self.first_step: int | None = None
        self.started = self.window_start = time.perf_counter()
        self.window_steps = 0
        self.last_emit = 0.0

    def step(self, state: LoopState, loss: float, lr: float) -> None:
        self.trainer.tracker.train_step(state.step, loss, lr)  # every step; sent at this cadence
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step = state.step - 1
            self.started = self.window_start = now - 1e-9
            self.window_steps = 0
        self.window_steps += 1
        done = state.step >= self.total
        throttled = now - self.last_emit < self.trainer.cfg.env.progress_seconds
        if throttled and not done and state.step - self.first_step > 1:
            return
        # the first step of an attempt has no window behind it to measure a rate over
        rate = (self.window_steps * self.samples_per_step / (now - self.window_start)
                if state.step - self.first_step > 1 else None)
        steps_this_attempt = state.step - self.first_step
        eta = (self.total - state.step) * (now - self.started) / max(1, steps_this_attempt)
        spec = self.trainer.spec
        self.trainer.emit("progress", epoch=state.epoch + 1, epochs=spec.training.epochs, step=state.step,
                          total_steps=self.total, loss=loss, lr=lr,
                          samples_per_second=round(rate, 3) if rate is not None else None,
                          eta_seconds=round(eta, 3), skipped_rows=self.skipped_rows() or None)
        self.trainer.info("epoch %d step %d/%d loss %.4f lr %.3g %.1f samples/s", state.epoch + 1, state.step,
                          self.total, loss, lr, rate or 0.0)
        self.last_emit, self.window_start, self.window_steps = now, now, 0


@dataclass(frozen=True)
class _RetrievalSet:
    """Query texts, the unique index images and which images each query should find."""

    task: evaluate.RetrievalTask
    images: list[Any]

    @classmethod
    def of(cls, query: PairSet, index: PairSet, max_queries: int | None) -> _RetrievalSet:
        task = evaluate.RetrievalTask.build(query.keyed()[: max_queries or None], index.keyed())
        by_key = {p.image.key: p.image for p in index.pairs}
        return cls(task, [by_key[k] for k in task.index_keys])


@dataclass(frozen=True)
class _ZeroShotSet:
    """Labelled images and one prompt per (class, template), class-major."""

    classes: list[str]
    prompts: list[str]
    labels: list[int]
    images: list[Any]

    @classmethod
    def of(cls, labelled: PairSet, templates: list[str]) -> _ZeroShotSet:
        classes = sorted({p.text for p in labelled.pairs})
        position = {name: i for i, name in enumerate(classes)}
        return cls(classes, [t.replace("{}", name) for name in classes for t in templates],
                   [position[p.text] for p in labelled.pairs], [p.image for p in labelled.pairs])


class _Evaluator:
    """Validation loss and retrieval metrics on rank 0, with the validation transforms."""

    def __init__(self, trainer: Trainer, bundle: model_lib.ModelBundle, data: Datasets) -> None:
        self.trainer = trainer
        self.bundle = bundle
        self.spec = trainer.spec.callbacks.evaluation
        self.val = data.val
        self.enabled = data.query is not None and data.index is not None
        self.target = _RetrievalSet.of(data.query, data.index, self.spec.max_queries) if (
            data.query is not None and data.index is not None) else None
        self.reference = _RetrievalSet.of(data.reference, data.reference, self.spec.max_queries) if (
            data.reference is not None) else None
        self.zero_shot = _ZeroShotSet.of(data.zero_shot, self.spec.zero_shot_templates) if (
            data.zero_shot is not None) else None
        self._val_cache: PairDataset | None = None

    def val_loss(self, model: nn.Module, loss_fn: nn.Module) -> float:
        if self.val is None:
            return math.nan
        if self._val_cache is None:
            self._val_cache = PairDataset(self.val.pairs, self.bundle.preprocess_val, self.bundle.tokenizer)
        loader = make_loader(self._val_cache, self._workers([p.image for p in self.val.pairs]), False,
                             batch_size=self.trainer.spec.training.batch_size)
        data = self.trainer.spec.data
        bad_rows = BadRows(self.val.name, data.skip_bad_rows, data.bad_row_limit)

        def batches() -> Iterator[loop.Batch]:
            for images, texts, bad, reasons in loader:
                error = bad_rows.record_batch(bad.tolist(), reasons, UNUSABLE)
                if error is not None:
                    raise error
                yield images, texts

        return loop.validation_loss(loop.unwrap(model), loss_fn, batches(), self.trainer.device,
                                    self.trainer.precision)

    def _workers(self, images: Sequence[ImageRef]) -> int:
        # images decoded in memory already (a set checked up front): worker start-up would cost more than it saves
        return 0 if all(ref.decoded is not None for ref in images) else self.trainer.spec.training.num_workers

    def retrieval(self, model: nn.Module, stage: str, epoch: int, on: _RetrievalSet | None = None,
                  emit: bool = True) -> dict[str, float]:
        """Both directions' metrics on ``on`` (default: the evaluation queries and index)."""
        if not self.trainer.dist.is_main:  # the other ranks wait for rank 0 (see distributed.SoloPhases)
            return {}
        target = on or self.target
        assert target is not None
        started = time.perf_counter()
        net = loop.unwrap(model)
        was_training = net.training
        net.eval()
        text_emb, image_emb = self._encode(net, target.task.query_texts, target.images)
        zero_shot = None
        if on is None and self.zero_shot is not None:  # beside the target set's retrieval
            zs = self.zero_shot
            prompts, zs_images = self._encode(net, zs.prompts, zs.images)
            classes = F.normalize(prompts, dim=-1).reshape(len(zs.classes), -1, prompts.shape[-1]).mean(1)
            zero_shot = evaluate.zero_shot_accuracy(zs_images, classes, zs.labels)
        net.train(was_training)
        metrics = evaluate.both_directions(text_emb, image_emb, target.task, k=self.spec.limit,
                                           distance=self.spec.distance)
        metrics.update(zero_shot or {})
        if not emit:
            return metrics
        self.trainer.emit("evaluation", stage=stage, epoch=epoch, metrics=metrics)
        self.trainer.info("evaluation (%s, %.1fs): %s", stage, time.perf_counter() - started,
                          ", ".join(f"{k}={metrics[k]:.4f}" for k in ("R@1", "R@5", "reciprocal_rank", "ndcg_at_k",
                                                                      "image_to_text_R@1")))
        return metrics

    def _encode(self, net: nn.Module, texts: list[str], images: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of ``texts`` and ``images`` (validation transforms), in evaluation batches."""
        device, precision, batch = self.trainer.device, self.trainer.precision, self.spec.batch_size
        tokens = tokenize(self.bundle.tokenizer, texts)
        text_emb = loop.encode(net.encode_text, list(tokens.split(batch)), device, precision)  # type: ignore[arg-type]
        loader = make_loader(ImageDataset(images, self.bundle.preprocess_val), self._workers(images), False,
                             batch_size=batch)
        skip = self.trainer.spec.data.skip_bad_rows

        def batches() -> Iterator[torch.Tensor]:
            # evaluation streams: O(batch) images in memory, and only the index's embeddings kept
            unusable = 0
            for pixels, reasons in loader:
                broken = [why for why in reasons if why]
                if broken and not skip:
                    raise DataError("evaluation", None, broken[0])
                if broken and not unusable:
                    self.trainer.info("evaluation: %s; it is encoded as a blank image (skipBadRows)", broken[0])
                unusable += len(broken)
                yield pixels
            if unusable:
                self.trainer.info("evaluation: %d images were unusable and encoded as blank ones", unusable)

        return text_emb, loop.encode(net.encode_image, batches(), device, precision)  # type: ignore[arg-type]
