"""kubetune: Kubernetes-native fine-tuning of CLIP models for text-to-image search.

Finetuner code runs with one import changed (``import kubetune as finetuner``; docs/finetuner.md):

    import kubetune
    run = kubetune.fit(model="ViT-B-32", pretrained="laion2b_s34b_b79k", train_data="train.csv", epochs=5)
    for line in run.stream_logs(): print(line)
    artifact = run.save_artifact("clip-model")
    text_model = kubetune.get_model(artifact, select_model="clip-text")
    kubetune.encode(text_model, ["a red dress"])

Layout: :mod:`kubetune.api` (the contract: spec, events, trainer environment), :mod:`kubetune.lifecycle` (the
run's rules, pure), :mod:`kubetune.storage` (S3 and artifacts), :mod:`kubetune.operator` (kopf),
:mod:`kubetune.sdk` (SDK and CLI).

Importing this package is cheap: the SDK's names are loaded on first use (no torch, no Kubernetes client
at import time).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# the module that defines them → public names
_EXPORTS = {
    "sdk.client": ("fit", "submit", "get_run", "list_runs", "Run", "Client", "configure"),
    "sdk.callbacks": ("EvaluationCallback", "WiSEFTCallback", "EarlyStopping", "BestModelCheckpoint", "WandBLogger",
                      "MLflowLogger"),
    "sdk.documents": ("Document", "DocumentArray"),
    "sdk.models": ("get_model", "encode", "describe_models", "verify_artifact", "Model"),
    "sdk.local": ("run_local", "LocalRun"),
    "sdk.report": ("write_report",),
    "api.errors": ("KubetuneError", "ConfigInvalid", "RunNotFound", "RunAlreadyExists", "RunNotFinished", "RunFailed",
                   "ArtifactMissing", "ArtifactCorrupt", "ClusterUnavailable", "StorageUnavailable", "MissingExtra",
                   "LocalRunFailed"),
}
_LAZY = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [  # noqa: RUF022
    "__version__",
    "ArtifactCorrupt", "ArtifactMissing", "BestModelCheckpoint", "Client", "ClusterUnavailable",
    "ConfigInvalid", "Document", "DocumentArray", "EarlyStopping", "EvaluationCallback", "KubetuneError", "LocalRun",
    "LocalRunFailed", "MLflowLogger", "MissingExtra", "Model", "Run", "RunAlreadyExists", "RunFailed",
    "RunNotFinished", "RunNotFound", "StorageUnavailable", "WandBLogger", "WiSEFTCallback", "configure",
    "describe_models", "encode", "fit", "get_model",
    "get_run", "list_runs", "run_local", "submit", "verify_artifact", "write_report",
]

if TYPE_CHECKING:
    from .api.errors import (
        ArtifactCorrupt,
        ArtifactMissing,
        ClusterUnavailable,
        ConfigInvalid,
        KubetuneError,
        LocalRunFailed,
        MissingExtra,
        RunAlreadyExists,
        RunFailed,
        RunNotFinished,
        RunNotFound,
        StorageUnavailable,
    )
    from .sdk.callbacks import (
        BestModelCheckpoint,
        EarlyStopping,
        EvaluationCallback,
        MLflowLogger,
        WandBLogger,
        WiSEFTCallback,
    )
    from .sdk.client import Client, Run, configure, fit, get_run, list_runs, submit
    from .sdk.documents import Document, DocumentArray
    from .sdk.local import LocalRun, run_local
    from .sdk.models import Model, describe_models, encode, get_model, verify_artifact
    from .sdk.report import write_report


def __getattr__(name: str) -> Any:
    if name == "callback":  # Finetuner's module path: kubetune.callback.EvaluationCallback without an import
        return importlib.import_module(".callback", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kubetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
