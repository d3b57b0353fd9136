"""Finetuner's ``finetuner.callback`` under kubetune: ``from kubetune.callback import EvaluationCallback``.

The classes live in :mod:`kubetune.sdk.callbacks`; this module only gives them Finetuner's import path.
"""

from kubetune.sdk.callbacks import (
    BestModelCheckpoint,
    EarlyStopping,
    EvaluationCallback,
    MLFlowLogger,
    MLflowLogger,
    WandBLogger,
    WiSEFTCallback,
)

__all__ = ["BestModelCheckpoint", "EarlyStopping", "EvaluationCallback", "MLFlowLogger", "MLflowLogger", "WandBLogger",
           "WiSEFTCallback"]
