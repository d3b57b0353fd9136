"""The run config: a FinetuneRun object (apiVersion, kind, metadata, spec) or a bare spec, YAML or JSON.

Validated with the same :class:`kubetune.spec.FinetuneRunSpec` the operator and SDK use; any problem is a
:class:`ConfigError` (permanent failure, exit code 78).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubetune.spec import API_VERSION, DNS_LABEL, KIND, FinetuneRunSpec
from pydantic import ValidationError

DEFAULT_CONFIG = "/etc/kubetune/run.yaml"
DEFAULT_NAMESPACE = "default"
DEFAULT_NAME = "local"


class ConfigError(Exception):
    """The run config cannot be read or is invalid (permanent)."""


@dataclass(frozen=True)
class RunConfig:
    spec: FinetuneRunSpec
    name: str
    namespace: str
    output_dir: Path | None = None  # local mode: the run's root directory; None: the S3 store in spec.output
    work_dir: Path = Path("/tmp/kubetune")  # scratch: downloaded images, weights, checkpoints in flight


def parse_run_document(doc: Any, source: str = "config") -> tuple[FinetuneRunSpec, str | None, str | None]:
    """Validate a parsed document; returns (spec, name, namespace) (name/namespace from metadata, if any)."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(doc).__name__}")
    name = namespace = None
    body: Any = doc
    if "spec" in doc or "kind" in doc or "apiVersion" in doc:
        if doc.get("kind", KIND) != KIND:
            raise ConfigError(f"{source}: kind must be {KIND}, got {doc.get('kind')!r}")
        if doc.get("apiVersion", API_VERSION) != API_VERSION:
            raise ConfigError(f"{source}: apiVersion must be {API_VERSION}, got {doc.get('apiVersion')!r}")
        metadata = doc.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ConfigError(f"{source}: metadata must be a mapping")
        name, namespace = metadata.get("name"), metadata.get("namespace")
        body = doc.get("spec")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: spec must be a mapping")
    try:
        spec = FinetuneRunSpec.model_validate(body)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}"
                            for err in exc.errors())
        raise ConfigError(f"{source}: invalid spec: {details}") from None
    return spec, name, namespace


def load_run_file(path: str | os.PathLike[str]) -> tuple[FinetuneRunSpec, str | None, str | None]:
    """Read a YAML or JSON run file (YAML is a superset of JSON, so one parser reads both)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the run config {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON: {str(exc)[:300]}") from None
    return parse_run_document(doc, str(path))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer",
                                     description="Fine-tune an open_clip CLIP model for text-to-image search.")
    parser.add_argument("--config", default=os.environ.get("KUBETUNE_CONFIG", DEFAULT_CONFIG),
                        help=f"FinetuneRun or spec, YAML/JSON (default: $KUBETUNE_CONFIG or {DEFAULT_CONFIG})")
    parser.add_argument("--output-dir", default=None,
                        help="local mode: write checkpoints and the artifact under this directory instead of S3")
    parser.add_argument("--run-name", default=None, help="run name (default: metadata.name, $KUBETUNE_RUN_NAME)")
    parser.add_argument("--namespace", default=None,
                        help="run namespace (default: metadata.namespace, $KUBETUNE_NAMESPACE, 'default')")
    parser.add_argument("--work-dir", default=os.environ.get("KUBETUNE_WORK_DIR"),
                        help="scratch directory (default: <output-dir>/.work or /tmp/kubetune)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes to launch through torchrun (default: spec.resources.gpus when > 1 "
                             "and that many GPUs are visible)")
    return parser


def resolve(args: argparse.Namespace) -> RunConfig:
    spec, meta_name, meta_namespace = load_run_file(args.config)
    name = args.run_name or meta_name or os.environ.get("KUBETUNE_RUN_NAME") or DEFAULT_NAME
    namespace = args.namespace or meta_namespace or os.environ.get("KUBETUNE_NAMESPACE") or DEFAULT_NAMESPACE
    for what, value in (("run name", name), ("namespace", namespace)):
        if not re.match(DNS_LABEL, value) or len(value) > 253:
            raise ConfigError(f"{what} {value!r} is not a valid Kubernetes name")
    output_dir = Path(args.output_dir).resolve() if args.output_dir else None
    if output_dir is None and not (spec.output.endpoint and spec.output.bucket):
        raise ConfigError("spec.output.endpoint and spec.output.bucket are required without --output-dir")
    if args.work_dir:
        work = Path(args.work_dir)
    elif output_dir is not None:
        work = output_dir / ".work"
    else:
        work = Path("/tmp/kubetune")
    return RunConfig(spec=spec, name=name, namespace=namespace, output_dir=output_dir, work_dir=work.resolve())
