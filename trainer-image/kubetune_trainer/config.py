"""The run config: a FinetuneRun object (apiVersion, kind, metadata, spec) or a bare spec, YAML or JSON.

Validated with the same :class:`kubetune.spec.FinetuneRunSpec` the operator and SDK use; any problem is a
:class:`ConfigError` (permanent failure, exit code 78). The ``KUBETUNE_*`` environment comes in as one
:class:`kubetune.trainer_env.TrainerEnv`, read once by ``__main__``; command-line flags win over it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from kubetune.spec import API_VERSION, DNS_LABEL, KIND, FinetuneRunSpec
from kubetune.trainer_env import DEFAULT_CONFIG, TrainerEnv, variable
from pydantic import ValidationError

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
    env: TrainerEnv = field(default_factory=TrainerEnv)


class RunDocument(NamedTuple):
    spec: FinetuneRunSpec
    name: str | None  # metadata.name, metadata.namespace, metadata.uid (None for a bare spec)
    namespace: str | None
    uid: str | None


def parse_run_document(doc: Any, source: str = "config") -> RunDocument:
    """Validate a parsed document: the spec and what its metadata says, if it has any."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(doc).__name__}")
    name = namespace = uid = None
    body: Any = doc
    if "spec" in doc or "kind" in doc or "apiVersion" in doc:
        if doc.get("kind", KIND) != KIND:
            raise ConfigError(f"{source}: kind must be {KIND}, got {doc.get('kind')!r}")
        if doc.get("apiVersion", API_VERSION) != API_VERSION:
            raise ConfigError(f"{source}: apiVersion must be {API_VERSION}, got {doc.get('apiVersion')!r}")
        metadata = doc.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ConfigError(f"{source}: metadata must be a mapping")
        name, namespace, uid = metadata.get("name"), metadata.get("namespace"), metadata.get("uid")
        body = doc.get("spec")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: spec must be a mapping")
    try:
        spec = FinetuneRunSpec.model_validate(body)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}"
                            for err in exc.errors())
        raise ConfigError(f"{source}: invalid spec: {details}") from None
    return RunDocument(spec, name, namespace, None if uid is None else str(uid))


def load_run_file(path: str | os.PathLike[str]) -> RunDocument:
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


def build_parser(env: TrainerEnv | None = None) -> argparse.ArgumentParser:
    """The trainer's flags; their defaults come from ``env`` (the ``KUBETUNE_*`` variables)."""
    env = env or TrainerEnv()
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer",
                                     description="Fine-tune an open_clip CLIP model for text-to-image search.")
    parser.add_argument("--config", default=env.config,
                        help=f"FinetuneRun or spec, YAML/JSON (default: ${variable('config')} or {DEFAULT_CONFIG})")
    parser.add_argument("--output-dir", default=None,
                        help="local mode: write checkpoints and the artifact under this directory instead of S3")
    parser.add_argument("--run-name", default=None,
                        help=f"run name (default: metadata.name, ${variable('run_name')})")
    parser.add_argument("--namespace", default=None,
                        help=f"run namespace (default: metadata.namespace, ${variable('run_namespace')}, 'default')")
    parser.add_argument("--work-dir", default=env.work_dir,
                        help="scratch directory (default: <output-dir>/.work or /tmp/kubetune)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes to launch through torchrun (default: spec.resources.gpus when > 1 "
                             "and that many GPUs are visible)")
    return parser


def resolve(args: argparse.Namespace, env: TrainerEnv | None = None) -> RunConfig:
    """The run config from the flags, the config file and ``env``. A config whose ``metadata.uid`` is not the
    run uid the operator passed is refused: it is left from an earlier run of the same name (a ConfigMap not yet
    replaced), and training its spec would write into the new run's store."""
    env = env or TrainerEnv()
    spec, meta_name, meta_namespace, meta_uid = load_run_file(args.config)
    if env.run_uid is not None and meta_uid != env.run_uid:
        owner = f"run uid {meta_uid}" if meta_uid else "no run uid (metadata.uid is missing)"
        raise ConfigError(f"{args.config} is not this run's config: it names {owner}, but this run is "
                          f"{env.run_uid} (${variable('run_uid')}), so it is stale, left from an earlier run of "
                          f"the same name")
    name = args.run_name or meta_name or env.run_name or DEFAULT_NAME
    namespace = args.namespace or meta_namespace or env.run_namespace or DEFAULT_NAMESPACE
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
    return RunConfig(spec=spec, name=name, namespace=namespace, output_dir=output_dir, work_dir=work.resolve(),
                     env=env)
