"""The API contract: what a FinetuneRun is and what crosses the boundaries between its parts.

- :mod:`~kubetune.api.spec` — the one typed model of a run's spec and status (the CRD is generated from it);
- :mod:`~kubetune.api.validation` — the one formatter of spec errors (field path and reason);
- :mod:`~kubetune.api.runfile` — the one reader of run files (YAML/JSON FinetuneRun documents);
- :mod:`~kubetune.api.errors` — typed user errors, each with its hint and CLI exit code;
- :mod:`~kubetune.api.events` — the trainer's structured events, exit codes and termination message;
- :mod:`~kubetune.api.trainer_env` — every ``KUBETUNE_*`` variable the trainer reads;
- :mod:`~kubetune.api.models` — each model name's default pretrained tag, the model mirror's layout;
- :mod:`~kubetune.api.names` — the names and labels of a run's Kubernetes objects;
- :mod:`~kubetune.api.crd` — the CustomResourceDefinition, generated from the spec model.

Nothing here talks to Kubernetes or S3, and nothing imports torch.
"""
