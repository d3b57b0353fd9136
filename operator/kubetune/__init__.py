"""kubetune: Kubernetes-native fine-tuning of CLIP models for text-to-image search.

    import kubetune
    run = kubetune.fit(model="ViT-B-32", pretrained="laion2b_s34b_b79k", train_data="train.csv", epochs=5)
    for line in run.stream_logs(): print(line)
    artifact = run.save_artifact("clip-model")
    text_model = kubetune.get_model(artifact, select_model="clip-text")
    kubetune.encode(text_model, ["a red dress"])

Importing this package is cheap: the SDK's names are loaded on first use (no torch, no Kubernetes client
at import time).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name → the module that defines it
_LAZY = {
    "fit": "client", "submit": "client", "get_run": "client", "list_runs": "client", "Run": "client",
    "Client": "client", "configure": "client",
    "EvaluationCallback": "callbacks", "WiSEFTCallback": "callbacks", "EarlyStopping": "callbacks",
    "BestModelCheckpoint": "callbacks",
    "get_model": "models", "encode": "models", "describe_models": "models", "verify_artifact": "models",
    "Model": "models",
    "run_local": "local", "LocalRun": "local",
    "write_report": "report",
    "KubetuneError": "errors", "ConfigInvalid": "errors", "RunNotFound": "errors", "RunAlreadyExists": "errors",
    "RunNotFinished": "errors", "RunFailed": "errors", "ArtifactMissing": "errors", "ArtifactCorrupt": "errors",
    "ClusterUnavailable": "errors", "StorageUnavailable": "errors", "MissingExtra": "errors",
    "LocalRunFailed": "errors",
}
__all__ = [  # noqa: RUF022
    "__version__",
    "ArtifactCorrupt", "ArtifactMissing", "BestModelCheckpoint", "Client", "ClusterUnavailable",
    "ConfigInvalid", "EarlyStopping", "EvaluationCallback", "KubetuneError", "LocalRun", "LocalRunFailed",
    "MissingExtra", "Model", "Run", "RunAlreadyExists", "RunFailed", "RunNotFinished", "RunNotFound",
    "StorageUnavailable", "WiSEFTCallback", "configure", "describe_models", "encode", "fit", "get_model",
    "get_run", "list_runs", "run_local", "submit", "verify_artifact", "write_report",
]

if TYPE_CHECKING:
    from .callbacks import BestModelCheckpoint, EarlyStopping, EvaluationCallback, WiSEFTCallback
    from .client import Client, Run, configure, fit, get_run, list_runs, submit
    from .errors import (
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
    from .local import LocalRun, run_local
    from .models import Model, describe_models, encode, get_model, verify_artifact
    from .report import write_report


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kubetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
