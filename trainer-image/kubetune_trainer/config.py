"""The run config: a FinetuneRun object (apiVersion, kind, metadata, spec) or a bare spec, YAML or JSON.

Validated with the same :class:`kubetune.api.spec.FinetuneRunSpec` the operator and SDK use; any problem is a
:class:`ConfigError` (permanent failure, exit code 78). The ``KUBETUNE_*`` environment comes in as one
:class:`kubetune.api.trainer_env.TrainerEnv`, read once by ``__main__``; command-line flags win over it.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.api import runfile
from kubetune.api.errors import ConfigInvalid
from kubetune.api.runfile import RunFile
from kubetune.api.spec import DNS_LABEL, FinetuneRunSpec
from kubetune.api.trainer_env import DEFAULT_CONFIG, TrainerEnv, variable

DEFAULT_NAMESPACE = "default"
DEFAULT_NAME = "local"


class ConfigError(Exception):
    """The run config cannot be read or is invalid (permanent)."""


@dataclass(frozen=True)
class RunConfig:
    spec: FinetuneRunSpec
    name: str
    namespace: str
    uid: str | None = None  # the FinetuneRun's uid: its store is <prefix>/<namespace>/<name>/<uid>
    output_dir: Path | None = None  # local mode: the run's root directory; None: the S3 store in spec.output
    work_dir: Path = Path("/tmp/kubetune")  # scratch: downloaded images, weights, checkpoints in flight
    env: TrainerEnv = field(default_factory=TrainerEnv)


def load_run_file(path: str | os.PathLike[str]) -> RunFile:
    """The run config, read by the same parser as local mode and submit (:func:`kubetune.api.runfile.load`); any
    problem is a :class:`ConfigError`."""
    try:
        return runfile.load(path)
    except ConfigInvalid as exc:
        raise ConfigError(exc.message) from None


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
    run uid the operator passed is refused: it is left from an earlier run of the same name (a Job of an earlier
    run not yet gone), and training its spec would write into the new run's store."""
    env = env or TrainerEnv()
    run = load_run_file(args.config)
    spec, meta_name, meta_namespace, meta_uid = run.spec, run.name, run.namespace, run.uid
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
    return RunConfig(spec=spec, name=name, namespace=namespace, uid=meta_uid or env.run_uid, output_dir=output_dir,
                     work_dir=work.resolve(), env=env)
