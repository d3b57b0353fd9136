"""Finetuner's ``finetuner.run`` under kubetune: ``kubetune.run.Run`` is :class:`kubetune.sdk.client.Run`."""

from kubetune.sdk.client import Run

__all__ = ["Run"]
