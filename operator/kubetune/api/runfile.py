"""Reading a run file (a whole FinetuneRun object, or a bare spec) the same way for local mode and submit.

Relative data paths in a run file are relative to the file itself, so ``examples/quickstart.yaml`` with
``data.train: data/train.csv`` means ``examples/data/train.csv`` wherever the command is run from:
:func:`resolve_local_paths` makes them absolute (local mode); :mod:`kubetune.sdk.client` uploads them to S3 and
rewrites them to ``s3://`` URIs (submit).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.errors import ConfigInvalid
from kubetune.api.spec import API_VERSION, KIND, FinetuneRunSpec
from kubetune.api.validation import format_errors, validate_spec

DATA_FIELDS = ("train", "eval", "query", "index", "reference", "zero_shot")
REMOTE_PREFIXES = ("s3://", "http://", "https://")


@dataclass
class RunFile:
    """A parsed, validated run file."""

    spec: FinetuneRunSpec
    name: str | None
    namespace: str | None
    base_dir: Path  # the directory relative data paths are resolved against
    labels: dict[str, str]
    annotations: dict[str, str]
    uid: str | None = None  # metadata.uid: set in the config the operator mounts for a trainer pod

    def document(self, name: str | None = None, namespace: str | None = None) -> dict[str, Any]:
        """The FinetuneRun object (camelCase) for the Kubernetes API or the trainer's ``--config``."""
        metadata: dict[str, Any] = {"name": name or self.name or "local"}
        if namespace or self.namespace:
            metadata["namespace"] = namespace or self.namespace
        if self.labels:
            metadata["labels"] = dict(self.labels)
        if self.annotations:
            metadata["annotations"] = dict(self.annotations)
        return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": self.spec.dump()}


def parse_document(doc: Any, source: str = "run file", base_dir: str | os.PathLike[str] = ".") -> RunFile:
    """Validate a parsed document with the shared spec model; :class:`ConfigInvalid` says what is wrong. The one
    reader of run files: local mode, submit and the trainer (its mounted config) all come through here."""
    if not isinstance(doc, dict):
        raise ConfigInvalid(f"{source}: expected a mapping, got {type(doc).__name__}",
                            "write a FinetuneRun object (see examples/quickstart.yaml)")
    metadata: dict[str, Any] = {}
    body: Any = doc
    if "spec" in doc or "kind" in doc or "apiVersion" in doc:
        if doc.get("kind", KIND) != KIND or doc.get("apiVersion", API_VERSION) != API_VERSION:
            raise ConfigInvalid(f"{source}: expected apiVersion {API_VERSION}, kind {KIND}; got "
                                f"{doc.get('apiVersion')!r}, {doc.get('kind')!r}")
        metadata = doc.get("metadata") or {}
        body = doc.get("spec")
        if not isinstance(metadata, dict) or not isinstance(body, dict):
            raise ConfigInvalid(f"{source}: metadata and spec must be mappings")
    spec, errors = validate_spec(body)
    if spec is None:
        raise ConfigInvalid(f"{source}: invalid spec: {format_errors(errors)}",
                            "`kubectl explain finetunerun.spec` or docs/sdk.md list the fields")
    uid = metadata.get("uid")
    return RunFile(spec=spec, name=metadata.get("name"), namespace=metadata.get("namespace"),
                   base_dir=Path(base_dir).resolve(), labels=dict(metadata.get("labels") or {}),
                   annotations=dict(metadata.get("annotations") or {}), uid=None if uid is None else str(uid))


def load(path: str | os.PathLike[str]) -> RunFile:
    """Read a YAML/JSON run file."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigInvalid(f"cannot read {p}: {exc.strerror}", "check the path") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigInvalid(f"{p}: not valid YAML: {str(exc)[:300]}") from None
    return parse_document(doc, str(p), p.parent)


def is_local(uri: str) -> bool:
    return not uri.startswith(REMOTE_PREFIXES)


def local_path(uri: str, base_dir: Path) -> Path:
    path = Path(uri.removeprefix("file://")).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def resolve_local_paths(spec: FinetuneRunSpec, base_dir: Path) -> FinetuneRunSpec:
    """A copy of ``spec`` whose local data (and weights) paths are absolute; fails when one does not exist."""
    data = spec.data.model_copy()
    for field in DATA_FIELDS:
        uri = getattr(data, field)
        if uri and is_local(uri):
            path = local_path(uri, base_dir)
            if not path.exists():
                raise ConfigInvalid(f"spec.data.{field}: {path} does not exist",
                                    "relative paths are relative to the run file")
            setattr(data, field, str(path))
    model = spec.model.model_copy()
    if model.weights and is_local(model.weights):
        path = local_path(model.weights, base_dir)
        if not path.exists():
            raise ConfigInvalid(f"spec.model.weights: {path} does not exist",
                                "relative paths are relative to the run file")
        model.weights = str(path)
    return spec.model_copy(update={"data": data, "model": model}, deep=False)


def with_spec(run: RunFile, spec: FinetuneRunSpec) -> RunFile:
    out = copy.copy(run)
    out.spec = spec
    return out
