"""The trainer-environment contract: one list of ``KUBETUNE_*`` variables for the operator, the trainer and the
stand-in image."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubetune.api.spec import FinetuneRunSpec
from kubetune.api.trainer_env import DEFAULT_TERMINATION_LOG, TrainerEnv, variable
from kubetune.operator import manifests
from kubetune.operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "tests" / "images" / "standin" / "standin.py"
TRAINER = ROOT / "trainer-image" / "kubetune_trainer"
CONTRACT = set(TrainerEnv.variables())


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) \
        and node.value.id == "os"


def _env_reads(source: str) -> Iterator[str | None]:
    """The names a module reads with ``os.environ.get``/``os.environ[...]``/``os.getenv`` (None: not a literal)."""
    for node in ast.walk(ast.parse(source)):
        key: ast.AST | None = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute) and (
                (node.func.attr == "get" and _is_environ(node.func.value))
                or (node.func.attr == "getenv" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "os")):
            key = node.args[0]
        elif isinstance(node, ast.Subscript) and _is_environ(node.value):
            key = node.slice
        else:
            continue
        yield key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else None


def _kubetune_literals(source: str) -> set[str]:
    """String literals that are exactly a ``KUBETUNE_*`` variable name."""
    return {node.value for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.startswith("KUBETUNE_") and node.value.replace("_", "").isalnum()
            and node.value.isupper()}


def test_the_contract_lists_each_variable_once_with_a_docstring() -> None:
    assert TrainerEnv.variables() == ("KUBETUNE_CONFIG", "KUBETUNE_RUN_NAME", "KUBETUNE_RUN_NAMESPACE",
                                      "KUBETUNE_RUN_UID", "KUBETUNE_ATTEMPT", "KUBETUNE_RESUME_FROM",
                                      "KUBETUNE_WORK_DIR", "KUBETUNE_PROGRESS_SECONDS", "KUBETUNE_LOG_LEVEL",
                                      "KUBETUNE_TERMINATION_LOG", "KUBETUNE_MODEL_MIRROR", "KUBETUNE_NODE_RANK",
                                      "KUBETUNE_RENDEZVOUS")
    module = ast.parse((ROOT / "operator" / "kubetune" / "api" / "trainer_env.py").read_text())
    body = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "TrainerEnv").body
    documented = {}
    for field, doc in itertools.pairwise(body):
        if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name):
            assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), field.target.id
            documented[field.target.id] = str(doc.value.value)
    assert set(documented) == {f.name for f in dataclasses.fields(TrainerEnv)}
    for name, text in documented.items():
        assert text.startswith(f"``{variable(name)}``"), name
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainerEnv().attempt = 2  # type: ignore[misc]


def test_from_env_and_to_env_round_trip() -> None:
    full = TrainerEnv(config="/c.yaml", run_name="clip-ft", run_namespace="team-a", run_uid="u-1", attempt=3,
                      resume_from="s3://b/p/team-a/clip-ft/checkpoints/step-00000040.pt", work_dir="/scratch",
                      progress_seconds=0.25, log_level="debug", termination_log="/dev/termination-log",
                      model_mirror="s3://models/mirror", node_rank=1, rendezvous="10.96.0.20:29500")
    assert full.log_level == "DEBUG"
    as_env = full.to_env()
    assert [e["name"] for e in as_env] == list(TrainerEnv.variables())
    assert all(set(e) == {"name", "value"} and isinstance(e["value"], str) for e in as_env)
    assert TrainerEnv.from_env({e["name"]: e["value"] for e in as_env}) == full
    assert TrainerEnv.from_env({}) == TrainerEnv()
    assert [e["name"] for e in TrainerEnv().to_env()] == ["KUBETUNE_CONFIG", "KUBETUNE_ATTEMPT",
                                                         "KUBETUNE_PROGRESS_SECONDS", "KUBETUNE_LOG_LEVEL"]
    # empty counts as unset; other variables are ignored
    assert TrainerEnv.from_env({"KUBETUNE_RUN_UID": "", "KUBETUNE_ATTEMPT": "", "KUBETUNE_NAMESPACE": "x",
                                "HOME": "/tmp"}) == TrainerEnv()
    assert TrainerEnv.from_env({"KUBETUNE_PROGRESS_SECONDS": "0", "KUBETUNE_ATTEMPT": " 2 "}) == TrainerEnv(
        progress_seconds=0.0, attempt=2)


@pytest.mark.parametrize(("name", "value"), [
    ("KUBETUNE_ATTEMPT", "two"), ("KUBETUNE_ATTEMPT", "0"), ("KUBETUNE_ATTEMPT", "1.5"),
    ("KUBETUNE_PROGRESS_SECONDS", "soon"), ("KUBETUNE_PROGRESS_SECONDS", "-1"), ("KUBETUNE_PROGRESS_SECONDS", "nan"),
    ("KUBETUNE_PROGRESS_SECONDS", "inf"), ("KUBETUNE_LOG_LEVEL", "LOUD"), ("KUBETUNE_RUN_NAME", "Clip_FT"),
    ("KUBETUNE_RUN_NAMESPACE", "-team"), ("KUBETUNE_RUN_NAME", "x" * 254), ("KUBETUNE_RUN_UID", "   "),
    ("KUBETUNE_MODEL_MIRROR", "models/mirror"), ("KUBETUNE_MODEL_MIRROR", "s3://Models"),
    ("KUBETUNE_NODE_RANK", "-1"), ("KUBETUNE_NODE_RANK", "first"), ("KUBETUNE_RENDEZVOUS", "10.96.0.20"),
    ("KUBETUNE_RENDEZVOUS", "http://rank0:29500"),
])
def test_a_bad_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}: "):
        TrainerEnv.from_env({name: value})


def test_the_default_termination_log_is_used_only_where_the_kubelet_made_it(tmp_path: Path) -> None:
    assert TrainerEnv(termination_log=str(tmp_path / "t")).termination_log_path() == str(tmp_path / "t")
    default = TrainerEnv().termination_log_path()
    assert default == (DEFAULT_TERMINATION_LOG if Path(DEFAULT_TERMINATION_LOG).exists() else None)


def test_the_real_trainer_reads_only_the_contract_and_only_through_it() -> None:
    recorded: list[str] = []

    class Recording(dict[str, str]):
        def get(self, key: str, default: Any = None) -> Any:
            recorded.append(key)
            return super().get(key, default)

    TrainerEnv.from_env(Recording())
    assert set(recorded) == CONTRACT
    for path in sorted(TRAINER.glob("*.py")):
        source = path.read_text()
        reads = list(_env_reads(source))
        assert not [r for r in reads if r is None or r.startswith("KUBETUNE_")], path.name  # only via TrainerEnv
        assert _kubetune_literals(source) <= CONTRACT, path.name
    local = (ROOT / "operator" / "kubetune" / "sdk" / "local.py").read_text()  # local mode sets trainer variables too
    assert _kubetune_literals(local) <= CONTRACT
    image_env = set(re.findall(r"\b(KUBETUNE_[A-Z0-9_]+)=", (ROOT / "trainer-image" / "Dockerfile").read_text()))
    assert image_env and image_env <= CONTRACT


def test_the_standin_reads_only_contract_variables() -> None:
    reads = list(_env_reads(STANDIN.read_text()))
    assert None not in reads
    names = {r for r in reads if r is not None and r.startswith("KUBETUNE_")}
    assert names == {"KUBETUNE_CONFIG", "KUBETUNE_RUN_UID", "KUBETUNE_ATTEMPT", "KUBETUNE_RESUME_FROM",
                     "KUBETUNE_TERMINATION_LOG"}
    assert names <= CONTRACT
    assert _kubetune_literals(STANDIN.read_text()) <= CONTRACT


def _job(resume_from: str | None = None, model_mirror: str | None = None) -> dict[str, Any]:
    run = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun",
           "metadata": {"name": "clip-ft", "namespace": "team-a", "uid": "1234-uid"},
           "spec": {"data": {"train": "s3://data/train.csv"}}}
    settings = OperatorSettings(trainer_image="kubetune/trainer:test", s3_endpoint="http://10.0.0.1:9000",
                                s3_bucket="models", s3_secret="s3-creds", model_mirror=model_mirror)
    return manifests.job(run, FinetuneRunSpec.model_validate(run["spec"]), settings, attempt=2,
                         resume_from=resume_from)


@pytest.mark.parametrize("resume_from", [None, "", "s3://models/kubetune/team-a/clip-ft/checkpoints/step-3.pt"])
def test_manifests_set_only_contract_variables(resume_from: str | None) -> None:
    container = _job(resume_from)["spec"]["template"]["spec"]["containers"][0]
    kubetune_env = [e for e in container["env"] if e["name"].startswith("KUBETUNE_")]
    assert {e["name"] for e in kubetune_env} <= CONTRACT
    assert all(set(e) == {"name", "value"} for e in kubetune_env)  # plain values: the trainer reads them as is
    env = TrainerEnv.from_env({e["name"]: e["value"] for e in kubetune_env})
    assert env == TrainerEnv(config="/etc/kubetune/run.yaml", run_name="clip-ft", run_namespace="team-a",
                             run_uid="1234-uid", attempt=2, resume_from=resume_from or None,
                             termination_log=container["terminationMessagePath"])


def test_the_operators_model_mirror_reaches_the_trainer() -> None:
    container = _job(model_mirror="s3://models/mirror")["spec"]["template"]["spec"]["containers"][0]
    env = TrainerEnv.from_env({e["name"]: e["value"] for e in container["env"] if e["name"].startswith("KUBETUNE_")})
    assert env.model_mirror == "s3://models/mirror"
    container = _job()["spec"]["template"]["spec"]["containers"][0]
    assert "KUBETUNE_MODEL_MIRROR" not in {e["name"] for e in container["env"]}
