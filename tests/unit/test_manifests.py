"""Pure manifest builders: ConfigMap and per-attempt Job."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from kubetune.api.spec import FinetuneRunSpec
from kubetune.operator import manifests
from kubetune.operator.settings import Capabilities, OperatorSettings

pytestmark = pytest.mark.unit

SETTINGS = OperatorSettings(trainer_image="kubetune/trainer:test", s3_endpoint="http://10.0.0.1:9000",
                            s3_bucket="models", s3_secret="s3-creds")


def _run(name: str = "clip-ft", spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun",
            "metadata": {"name": name, "namespace": "team-a", "uid": "1234-uid", "generation": 2},
            "spec": spec or {"data": {"train": "s3://data/train.csv"}}}


def _spec(run: dict[str, Any]) -> FinetuneRunSpec:
    return FinetuneRunSpec.model_validate(run["spec"])


def _container(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["containers"][0]


def test_job_names_are_deterministic_and_short() -> None:
    assert manifests.job_name("clip-ft", 1) == "clip-ft-a1"
    long = "x" * 200
    names = {manifests.job_name(long, n) for n in (1, 2)}
    assert len(names) == 2 and all(len(n) <= 63 for n in names)
    assert manifests.job_name(long, 3) == manifests.job_name(long, 3)
    assert manifests.job_name(long + "a", 1) != manifests.job_name(long + "b", 1)
    assert len(manifests.run_label(long)) <= 63
    assert len(manifests.config_map_name("y" * 253)) <= 253


def test_owner_references_and_labels() -> None:
    run = _run()
    spec = _spec(run)
    for child in (manifests.config_map(run, spec, SETTINGS), manifests.job(run, spec, SETTINGS, attempt=2)):
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun", "name": "clip-ft",
                       "uid": "1234-uid", "controller": True, "blockOwnerDeletion": True}
        assert child["metadata"]["namespace"] == "team-a"
        assert child["metadata"]["labels"][manifests.RUN_LABEL] == "clip-ft"
    job = manifests.job(run, spec, SETTINGS, attempt=2)
    assert job["metadata"]["name"] == "clip-ft-a2"
    assert job["metadata"]["labels"][manifests.ATTEMPT_LABEL] == "2"
    assert job["spec"]["template"]["metadata"]["labels"][manifests.RUN_LABEL] == "clip-ft"
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_config_map_holds_the_resolved_run() -> None:
    run = _run()
    cm = manifests.config_map(run, _spec(run), SETTINGS)
    assert cm["metadata"]["name"] == "clip-ft-config"
    doc = yaml.safe_load(cm["data"]["run.yaml"])
    assert doc["metadata"] == {"name": "clip-ft", "namespace": "team-a", "uid": "1234-uid", "generation": 2}
    spec = FinetuneRunSpec.model_validate(doc["spec"])  # the trainer reads it back like this
    assert spec.output.endpoint == "http://10.0.0.1:9000" and spec.output.bucket == "models"
    assert spec.output.credentials_secret is not None and spec.output.credentials_secret.name == "s3-creds"
    assert spec.resources.image == "kubetune/trainer:test"
    assert spec.training.epochs == 5  # defaults are resolved


def test_run_values_win_over_operator_defaults() -> None:
    run = _run(spec={"data": {"train": "s3://d/t.csv"},
                     "output": {"endpoint": "https://s3.example.com", "bucket": "mine",
                                "credentialsSecret": {"name": "mine", "accessKeyKey": "ak", "secretKeyKey": "sk"}},
                     "resources": {"image": "my/trainer:1", "imagePullPolicy": "Never"}})
    job = manifests.job(run, _spec(run), SETTINGS, attempt=1)
    container = _container(job)
    assert container["image"] == "my/trainer:1" and container["imagePullPolicy"] == "Never"
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://s3.example.com"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "mine", "key": "ak"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "mine", "key": "sk"}}


def test_credentials_only_through_secret_key_ref() -> None:
    run = _run()
    job = manifests.job(run, _spec(run), SETTINGS, attempt=1)
    env = {e["name"]: e for e in _container(job)["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    no_secret = OperatorSettings(s3_secret=None)
    env2 = {e["name"] for e in _container(manifests.job(run, _spec(run), no_secret, attempt=1))["env"]}
    assert "AWS_ACCESS_KEY_ID" not in env2


def test_security_context_is_hardened() -> None:
    run = _run()
    job = manifests.job(run, _spec(run), SETTINGS, attempt=1)
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = _container(job)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m for m in _container(job)["volumeMounts"]}
    assert mounts["/etc/kubetune"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["config"]["configMap"]["name"] == "clip-ft-config"


def test_scheduling_gpu_and_queue() -> None:
    run = _run(spec={
        "data": {"train": "s3://d/t.csv"}, "queueName": "gpu-queue",
        "resources": {"gpus": 2, "cpu": "8", "memory": "32Gi", "nodeSelector": {"gpu": "a100"},
                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                      "priorityClassName": "high", "imagePullSecrets": ["regcred"]}})
    job = manifests.job(run, _spec(run), SETTINGS, attempt=1, active_deadline_seconds=99.7)  # type: ignore[arg-type]
    assert job["metadata"]["labels"][manifests.QUEUE_LABEL] == "gpu-queue"
    assert job["spec"]["activeDeadlineSeconds"] == 99
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "high"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    res = _container(job)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "2"
    assert "nvidia.com/gpu" not in res["requests"]
    assert res["requests"] == {"cpu": "8", "memory": "32Gi"}
    cpu_only = _run(spec={"data": {"train": "s3://d/t.csv"}, "resources": {"gpus": 0}})
    assert "nvidia.com/gpu" not in _container(manifests.job(cpu_only, _spec(cpu_only), SETTINGS, attempt=1))[
        "resources"]["limits"]
    assert manifests.QUEUE_LABEL not in manifests.job(cpu_only, _spec(cpu_only), SETTINGS, attempt=1)["metadata"][
        "labels"]


def test_resume_and_attempt_env() -> None:
    run = _run()
    job = manifests.job(run, _spec(run), SETTINGS, attempt=3, resume_from="s3://models/ckpt/step-40")
    container = _container(job)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {k: v for k, v in env.items() if k.startswith("KUBETUNE_")} == {
        "KUBETUNE_CONFIG": "/etc/kubetune/run.yaml",
        "KUBETUNE_RUN_NAME": "clip-ft",
        "KUBETUNE_RUN_NAMESPACE": "team-a",
        "KUBETUNE_RUN_UID": "1234-uid",
        "KUBETUNE_ATTEMPT": "3",
        "KUBETUNE_RESUME_FROM": "s3://models/ckpt/step-40",
        "KUBETUNE_PROGRESS_SECONDS": "5.0",
        "KUBETUNE_LOG_LEVEL": "INFO",
        "KUBETUNE_TERMINATION_LOG": "/dev/termination-log",
    }
    assert env["PYTHONUNBUFFERED"] == "1" and env["HOME"] == "/tmp"
    first = manifests.job(run, _spec(run), SETTINGS, attempt=1)
    assert "KUBETUNE_RESUME_FROM" not in {e["name"] for e in _container(first)["env"]}


def test_termination_message_from_the_trainer_file_else_the_log() -> None:
    run = _run()
    container = _container(manifests.job(run, _spec(run), SETTINGS, attempt=1))
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_TERMINATION_LOG"] == container["terminationMessagePath"]


def test_capabilities_from_server_version() -> None:
    old = Capabilities.from_version("1", "20")
    assert not old.job_suspend and not old.pod_failure_policy
    new = Capabilities.from_version("1", "27+")
    assert new.job_suspend and new.pod_failure_policy
    run = _run()
    assert "podFailurePolicy" not in manifests.job(run, _spec(run), SETTINGS, attempt=1, capabilities=old)["spec"]
    pfp = manifests.job(run, _spec(run), SETTINGS, attempt=1, capabilities=new)["spec"]["podFailurePolicy"]
    assert pfp["rules"][0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}


def test_settings_from_env() -> None:
    s = OperatorSettings.from_env({"KUBETUNE_TRAINER_IMAGE": "a/b:c", "KUBETUNE_STATUS_INTERVAL": "2.5",
                                   "KUBETUNE_S3_SECRET": "", "KUBETUNE_RUN_AS_USER": "2000"})
    assert (s.trainer_image, s.status_interval, s.s3_secret, s.run_as_user) == ("a/b:c", 2.5, None, 2000)
    with pytest.raises(ValueError):
        OperatorSettings.from_env({"KUBETUNE_IMAGE_PULL_POLICY": "Sometimes"})


GPU_ENV = {"KUBETUNE_GPU_NODE_SELECTOR": '{"nvidia.com/gpu.present": "true", "pool": "gpu"}',
           "KUBETUNE_GPU_TOLERATIONS": '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, '
                                       '{"key": "spot", "operator": "Equal", "value": "yes", '
                                       '"effect": "NoExecute", "tolerationSeconds": 30}]'}


def test_settings_gpu_defaults_from_env() -> None:
    s = OperatorSettings.from_env(GPU_ENV)
    assert dict(s.gpu_node_selector) == {"nvidia.com/gpu.present": "true", "pool": "gpu"}
    assert [dict(t) for t in s.gpu_tolerations] == json.loads(GPU_ENV["KUBETUNE_GPU_TOLERATIONS"])
    empty = OperatorSettings.from_env({"KUBETUNE_GPU_NODE_SELECTOR": "", "KUBETUNE_GPU_TOLERATIONS": "null"})
    assert dict(empty.gpu_node_selector) == {} and empty.gpu_tolerations == ()
    assert OperatorSettings() == OperatorSettings.from_env({})
    with pytest.raises(TypeError):  # read-only
        s.gpu_node_selector["x"] = "y"  # type: ignore[index]
    for bad, match in [({"KUBETUNE_GPU_NODE_SELECTOR": "{nope"}, "not JSON"),
                       ({"KUBETUNE_GPU_NODE_SELECTOR": '["a"]'}, "JSON object"),
                       ({"KUBETUNE_GPU_NODE_SELECTOR": '{"a": 1}'}, r'SELECTOR\["a"\]: .*valid string'),
                       ({"KUBETUNE_GPU_TOLERATIONS": '{"key": "a"}'}, "array of objects"),
                       ({"KUBETUNE_GPU_TOLERATIONS": '[{"key": "a", "effect": "Sometimes"}]'},
                        r"KUBETUNE_GPU_TOLERATIONS\[0\]")]:
        with pytest.raises(ValueError, match=match):
            OperatorSettings.from_env(bad)


def test_gpu_defaults_apply_to_gpu_jobs_only_and_spec_wins() -> None:
    settings = OperatorSettings.from_env({**GPU_ENV, "KUBETUNE_TRAINER_IMAGE": "kubetune/trainer:test"})
    defaults = json.loads(GPU_ENV["KUBETUNE_GPU_TOLERATIONS"])
    # A GPU run without placement of its own gets the defaults.
    plain = _run(spec={"data": {"train": "s3://d/t.csv"}, "resources": {"gpus": 1}})
    pod = manifests.job(plain, _spec(plain), settings, attempt=1)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "gpu"}
    assert pod["tolerations"] == defaults
    # The run's own values win for the same key; its tolerations come first, defaults are appended, a duplicate
    # of a default is not repeated.
    own = _run(spec={"data": {"train": "s3://d/t.csv"},
                     "resources": {"gpus": 2, "nodeSelector": {"pool": "a100", "zone": "z1"},
                                   "tolerations": [{"key": "team", "operator": "Exists"},
                                                   {"key": "nvidia.com/gpu", "operator": "Exists",
                                                    "effect": "NoSchedule"}]}})
    pod = manifests.job(own, _spec(own), settings, attempt=1)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "a100", "zone": "z1"}
    assert pod["tolerations"] == [{"key": "team", "operator": "Exists"}, defaults[0], defaults[1]]
    # The resolved run config (run.yaml) shows the same placement.
    doc = yaml.safe_load(manifests.config_map(own, _spec(own), settings)["data"]["run.yaml"])
    assert doc["spec"]["resources"]["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert len(doc["spec"]["resources"]["tolerations"]) == 3
    # CPU-only runs keep their own placement, without the GPU defaults.
    cpu = _run(spec={"data": {"train": "s3://d/t.csv"},
                     "resources": {"gpus": 0, "nodeSelector": {"zone": "z1"}}})
    pod = manifests.job(cpu, _spec(cpu), settings, attempt=1)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"zone": "z1"} and "tolerations" not in pod
    # No defaults configured: GPU runs are unchanged.
    pod = manifests.job(plain, _spec(plain), SETTINGS, attempt=1)["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
