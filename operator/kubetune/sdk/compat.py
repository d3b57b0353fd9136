"""Finetuner's call shapes on kubetune's terms: ``fit``'s keyword arguments, ``device``, the run status dict and
Jina AI Cloud data set names. Pure functions used by :mod:`kubetune.sdk.client`; docs/finetuner.md is the table
of what maps to what.

Every Finetuner argument is either mapped (``optimizer='Adam'`` → ``'adam'``, ``model_artifact`` → ``weights``,
``description`` → an annotation, ``device``), accepted at its no-op value (``freeze=False``, ``sampler='auto'``...),
or refused with a :class:`~kubetune.api.errors.ConfigInvalid` that says what to write instead — never a TypeError.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kubetune.api.errors import ConfigInvalid
from kubetune.api.spec import GROUP, FinetuneRunStatus, Phase
from kubetune.sdk.documents import NO_CLOUD_HINT

DESCRIPTION_ANNOTATION = f"{GROUP}/description"
OPTIMIZERS = ("adam", "adamw", "sgd")
DEVICES = ("cuda", "cpu", "auto")

# ------------------------------------------------------------------------------------------------ run status
CREATED, STARTED, FINISHED, FAILED, CANCELLED = "CREATED", "STARTED", "FINISHED", "FAILED", "CANCELLED"
FINETUNER_STATUS: dict[str | None, str] = {
    None: CREATED, Phase.PENDING.value: CREATED, Phase.SUSPENDED.value: CREATED, Phase.RUNNING.value: STARTED,
    Phase.SUCCEEDED.value: FINISHED, Phase.FAILED.value: FAILED, Phase.CANCELLED.value: CANCELLED,
}
DEFAULT_DETAILS = {CREATED: "Run submitted and awaits execution", STARTED: "Run in progress",
                   FINISHED: "Run finished", FAILED: "Run failed", CANCELLED: "Run cancelled"}
STATUS_KEYS = ("status", "details")


class RunStatus(FinetuneRunStatus, Mapping[str, str]):
    """A run's status: the FinetuneRunStatus fields as attributes (``phase``, ``conditions``, ``progress``,
    ``metrics``, ``artifact``, ``log_tail``, ``message``...) and, read as a mapping, Finetuner's status dict
    ``{'status': 'CREATED'|'STARTED'|'FINISHED'|'FAILED'|'CANCELLED', 'details': str}``.

    Pending and Suspended runs are CREATED (waiting to run), Running is STARTED, Succeeded FINISHED; CANCELLED is
    kubetune's own (Finetuner had no cancel).
    """

    def finetuner(self) -> dict[str, str]:
        status = FINETUNER_STATUS.get(self.phase, STARTED)
        details = self.message or DEFAULT_DETAILS[status]
        if self.phase == Phase.SUSPENDED.value and not self.message:
            details = "Run suspended: unsuspend it to resume from its last checkpoint"
        elif status == STARTED and not self.message and self.progress and self.progress.summary:
            details = f"{details} ({self.progress.summary})"
        return {"status": status, "details": details}

    def __getitem__(self, key: str) -> str:
        return self.finetuner()[key]

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(STATUS_KEYS)

    def __len__(self) -> int:
        return len(STATUS_KEYS)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping) and not isinstance(other, BaseModel):
            return self.finetuner() == dict(other)
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def __str__(self) -> str:
        return str(self.finetuner())


# ------------------------------------------------------------------------------------------------ fit arguments
def _refuse(argument: str, reason: str, hint: str) -> ConfigInvalid:
    return ConfigInvalid(f"fit({argument}): {reason}", hint)


def translate_fit_options(options: Mapping[str, Any], accepted: Collection[str]) -> tuple[dict[str, Any],
                                                                                         dict[str, str]]:
    """Finetuner's ``fit`` keyword arguments → ``build_spec``'s, plus the run's annotations.

    ``accepted``: build_spec's own option names; any other name is refused, listing them.
    """
    out = dict(options)
    annotations: dict[str, str] = {}

    def pop(name: str, default: Any = None) -> Any:
        return out.pop(name, default)

    for name in ("learning_rate", "batch_size", "scheduler", "optimizer", "csv_options", "weights"):
        if name in out and out[name] is None:  # Finetuner's "let the service choose"
            del out[name]
    description = pop("description")
    if description:
        annotations[DESCRIPTION_ANNOTATION] = str(description)
    if pop("experiment_name") is not None:
        raise _refuse("experiment_name=...", "kubetune has no experiments",
                      "group runs by Kubernetes namespace: fit(..., namespace='shoes'), "
                      "kubetune.list_runs(namespace='shoes')")
    artifact = pop("model_artifact")
    if artifact is not None:
        if "weights" in out:
            raise _refuse("model_artifact=..., weights=...", "both name the starting weights", "keep one")
        out["weights"] = str(artifact)  # an artifact directory or its s3:// URI: training continues from it
    if pop("model_options"):
        raise _refuse("model_options=...", "open_clip models take no construction options",
                      "a custom architecture goes in model_config= (an open_clip config dict), the starting weights "
                      "in pretrained= or weights=")
    if pop("miner") is not None or pop("miner_options"):
        raise _refuse("miner=...", "CLIPLoss contrasts every (text, image) pair of a batch: there is no miner",
                      "drop miner and miner_options")
    if pop("loss_optimizer") is not None or pop("loss_optimizer_options"):
        raise _refuse("loss_optimizer=...", "CLIPLoss and SigLIPLoss have no parameters outside the model",
                      "drop loss_optimizer and loss_optimizer_options")
    optimizer = out.get("optimizer")
    if isinstance(optimizer, str) and optimizer.lower() in OPTIMIZERS:
        out["optimizer"] = optimizer.lower()  # Finetuner spells torch's class names: 'Adam', 'AdamW', 'SGD'
    _optimizer_options(pop("optimizer_options") or {}, out)
    if out.get("scheduler") == "constant_with_warmup":
        out["scheduler"] = "constant"  # with warmup_steps, which every kubetune schedule has
    _scheduler_options(pop("scheduler_options") or {}, out)
    step = pop("scheduler_step", "batch")
    if step != "batch":
        raise _refuse(f"scheduler_step={step!r}", "kubetune steps the learning-rate schedule every batch",
                      "drop scheduler_step")
    freeze = out.get("freeze")
    if isinstance(freeze, bool):
        del out["freeze"]
        if freeze:
            raise _refuse("freeze=True", "Finetuner froze all layers but the last; kubetune freezes whole towers",
                          "freeze=['image'] trains the text tower only, freeze=['text'] the image tower only")
    if pop("output_dim") is not None:
        raise _refuse("output_dim=...", "kubetune keeps the model's own embedding size (no projection head)",
                      "pick a backbone with the size you need: kubetune.describe_models()")
    cpu = out.get("cpu")
    if isinstance(cpu, bool):  # Finetuner's cpu=True/False; kubetune's cpu= is the pod's CPU quantity
        del out["cpu"]
        out.setdefault("device", "cpu" if cpu else "cuda")
    if pop("public", False):
        raise _refuse("public=True", "the artifact is stored in your own S3 bucket",
                      "share it with the bucket's access policy, or copy it: kubetune artifact pull NAME DIR")
    per_class = pop("num_items_per_class", 4)
    sampler = pop("sampler", "auto")
    if per_class != 4 or sampler not in ("auto", "random", None):
        raise _refuse("sampler=/num_items_per_class=", "CLIP training takes (text, image) pairs in random batches, "
                      "not classes", "drop sampler and num_items_per_class")
    csv_options = out.get("csv_options")
    if csv_options is not None and not isinstance(csv_options, Mapping):
        raise _refuse("csv_options=...", f"expected a dict, got {type(csv_options).__name__}",
                      "csv_options={'text_column': 'caption', 'image_column': 'url', 'skip_bad_rows': True}")
    unknown = sorted(set(out) - set(accepted))
    if unknown:
        raise ConfigInvalid(f"fit(): unknown argument(s) {', '.join(unknown)}",
                            f"kubetune's options: {', '.join(sorted(accepted))}")
    return out, annotations


def _optimizer_options(options: Mapping[str, Any], out: dict[str, Any]) -> None:
    rest = sorted(set(options) - {"weight_decay"})
    if rest:
        raise _refuse(f"optimizer_options={{{', '.join(map(repr, rest))}: ...}}",
                      "only weight_decay can be set", "write weight_decay=... (fit's own argument)")
    if "weight_decay" in options:
        out.setdefault("weight_decay", options["weight_decay"])


def _scheduler_options(options: Mapping[str, Any], out: dict[str, Any]) -> None:
    if options.get("scheduler_step", "batch") != "batch":
        raise _refuse("scheduler_options={'scheduler_step': 'epoch'}",
                      "kubetune steps the learning-rate schedule every batch", "drop scheduler_step")
    if "num_training_steps" in options:
        raise _refuse("scheduler_options={'num_training_steps': ...}", "the schedule spans the whole run",
                      "max_steps=... ends the run (and its schedule) after that many steps")
    rest = sorted(set(options) - {"num_warmup_steps", "scheduler_step"})
    if rest:
        raise _refuse(f"scheduler_options={{{', '.join(map(repr, rest))}: ...}}", "not supported",
                      "kubetune's schedule options: scheduler='cosine'|'linear'|'constant', warmup_steps=...")
    if "num_warmup_steps" in options:
        out.setdefault("warmup_steps", options["num_warmup_steps"])


def resolve_gpus(device: str | None, gpus: int | None) -> int:
    """``resources.gpus`` from Finetuner's ``device`` and kubetune's ``gpus``: 'cpu' → 0, 'cuda' → ``gpus`` or 1,
    'auto'/None → ``gpus`` or 1 (the trainer uses a GPU when its pod has one)."""
    if device is not None and device not in DEVICES:
        raise ConfigInvalid(f"fit(device={device!r}): expected 'cuda', 'cpu' or 'auto'",
                            "the number of GPUs is gpus=N (N > 1 trains with DDP)")
    if device == "cpu":
        if gpus:
            raise ConfigInvalid(f"fit(device='cpu', gpus={gpus}): a CPU run has no GPUs", "drop one of them")
        return 0
    if device == "cuda" and gpus == 0:
        raise ConfigInvalid("fit(device='cuda', gpus=0): a CUDA run needs a GPU", "gpus=1 or more, or device='cpu'")
    return 1 if gpus is None else gpus


# ------------------------------------------------------------------------------------------------ data names
def check_data_reference(value: str, set_name: str) -> None:
    """:class:`ConfigInvalid` for a string that is no file here and no URI, and has no file extension: the
    shape of Finetuner's Jina AI Cloud data set names (``finetuner/fashion-train-data-clip``). A missing file
    with an extension is left to the upload, which names it."""
    path = Path(value).expanduser()
    if "://" in value or path.exists() or path.suffix:
        return
    raise ConfigInvalid(f"{set_name}_data={value!r}: not a file here nor an s3:// or http(s) URI; Jina AI Cloud data "
                        "set names (Finetuner's 'owner/name') are not available to kubetune", NO_CLOUD_HINT)
