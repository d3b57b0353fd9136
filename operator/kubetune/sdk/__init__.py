"""The Python SDK and the CLI: Finetuner's verbs on a cluster (:mod:`~kubetune.sdk.client`) or on this machine
(:mod:`~kubetune.sdk.local`), models and encoding (:mod:`~kubetune.sdk.models`), reports. The
public names are re-exported, lazily, by :mod:`kubetune`.
"""
