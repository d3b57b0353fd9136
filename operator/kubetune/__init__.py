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
    "sdk.client": ("fit", "submit", "get_run", "list_runs", "delete_run", "login", "notebook_login", "Run", "Client",
                   "configure"),
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
# Finetuner's names that kubetune does not have: what to write instead
_FINETUNER_ONLY = {
    "build_model": "get_model(artifact, select_model=...) loads a fine-tuned tower; a backbone to start from is "
                   "fit(model='NAME::TAG') (describe_models() lists them)",
    "cos_sim": "embeddings from encode() are L2-normalised, so a @ b.T is the cosine similarity",
    "list_callbacks": "the callbacks are in kubetune.callback (EvaluationCallback, WiSEFTCallback, EarlyStopping, "
                      "BestModelCheckpoint, WandBLogger, MLflowLogger)",
    "list_models": "describe_models() lists the backbones and their pretrained tags",
    "list_model_options": "describe_models() lists the backbones; fit's options are in docs/finetuner.md",
    "delete_runs": "delete_run(name) deletes one run; `kubetune delete NAME...` several",
    "create_experiment": "runs are grouped by Kubernetes namespace: configure(namespace=...) or "
                         "fit(..., namespace=...)",
    "get_experiment": "runs are grouped by Kubernetes namespace: list_runs(namespace=...)",
    "list_experiments": "runs are grouped by Kubernetes namespace: list_runs(all_namespaces=True)",
    "delete_experiment": "runs are grouped by Kubernetes namespace: delete its runs with delete_run(name)",
    "get_token": "kubetune uses your kubeconfig's credentials; there is no token",
}
__all__ = [  # noqa: RUF022
    "__version__",
    "ArtifactCorrupt", "ArtifactMissing", "BestModelCheckpoint", "Client", "ClusterUnavailable",
    "ConfigInvalid", "Document", "DocumentArray", "EarlyStopping", "EvaluationCallback", "KubetuneError", "LocalRun",
    "LocalRunFailed", "MLflowLogger", "MissingExtra", "Model", "Run", "RunAlreadyExists", "RunFailed",
    "RunNotFinished", "RunNotFound", "StorageUnavailable", "WandBLogger", "WiSEFTCallback", "configure",
    "delete_run", "describe_models", "encode", "fit", "get_model",
    "get_run", "list_runs", "login", "notebook_login", "run_local", "submit", "verify_artifact", "write_report",
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
    from .sdk.client import (
        Client,
        Run,
        configure,
        delete_run,
        fit,
        get_run,
        list_runs,
        login,
        notebook_login,
        submit,
    )
    from .sdk.documents import Document, DocumentArray
    from .sdk.local import LocalRun, run_local
    from .sdk.models import Model, describe_models, encode, get_model, verify_artifact
    from .sdk.report import write_report


def __getattr__(name: str) -> Any:
    if name in ("callback", "run"):  # Finetuner's module paths: kubetune.callback.EvaluationCallback, kubetune.run.Run
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        hint = _FINETUNER_ONLY.get(name)
        raise AttributeError(f"module 'kubetune' has no attribute {name!r}" + (
            f" (Finetuner's {name} has no kubetune counterpart: {hint})" if hint else ""))
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
