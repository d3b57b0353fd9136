"""Pure manifest builders: the per-attempt Job, with the run config in its pod template."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api.spec import FinetuneRunSpec
from kubetune.operator import manifests
from kubetune.operator.settings import Capabilities, OperatorSettings
from kubetune.operator.supervisor import admission_refusal

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


def test_owner_references_and_labels() -> None:
    run = _run()
    spec = _spec(run)
    job = manifests.job(run, spec, SETTINGS, attempt=2)
    (ref,) = job["metadata"]["ownerReferences"]
    assert ref == {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun", "name": "clip-ft",
                   "uid": "1234-uid", "controller": True, "blockOwnerDeletion": True}
    assert job["metadata"]["namespace"] == "team-a"
    assert job["metadata"]["labels"][manifests.RUN_LABEL] == "clip-ft"
    assert job["metadata"]["name"] == "clip-ft-a2"
    assert job["metadata"]["labels"][manifests.ATTEMPT_LABEL] == "2"
    assert job["spec"]["template"]["metadata"]["labels"][manifests.RUN_LABEL] == "clip-ft"
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def _config(job: dict[str, Any]) -> Any:
    """The run config as the trainer reads it: the file the downward API volume makes of the annotation."""
    return yaml.safe_load(job["spec"]["template"]["metadata"]["annotations"][manifests.CONFIG_ANNOTATION])


def test_the_pod_template_carries_the_resolved_run_config_at_the_path_the_trainer_reads() -> None:
    run = _run()
    job = manifests.job(run, _spec(run), SETTINGS, attempt=1)
    container, pod = _container(job), job["spec"]["template"]["spec"]
    # KUBETUNE_CONFIG names the file the "config" volume's only item makes of the annotation
    env = {e["name"]: e.get("value") for e in container["env"]}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    (item,) = volume["downwardAPI"]["items"]
    assert env["KUBETUNE_CONFIG"] == f"{mount['mountPath']}/{item['path']}" == "/etc/kubetune/run.yaml"
    assert item["fieldRef"] == {"fieldPath": "metadata.annotations['kubetune.io/run-config']"}
    assert mount["readOnly"] is True
    doc = _config(job)
    assert doc["metadata"] == {"name": "clip-ft", "namespace": "team-a", "uid": "1234-uid", "generation": 2}
    spec = FinetuneRunSpec.model_validate(doc["spec"])  # the trainer reads it back like this
    assert spec.output.endpoint == "http://10.0.0.1:9000" and spec.output.bucket == "models"
    assert spec.output.credentials_secret is not None and spec.output.credentials_secret.name == "s3-creds"
    assert spec.resources.image == "kubetune/trainer:test"
    assert spec.training.epochs == 5  # defaults are resolved
    # stdlib-only readers (json.load) get the same spec
    as_json = json.loads(job["spec"]["template"]["metadata"]["annotations"][manifests.CONFIG_ANNOTATION])
    assert FinetuneRunSpec.model_validate(as_json["spec"]) == spec


def test_nothing_in_a_job_refers_to_a_config_map() -> None:
    """The operator holds no ConfigMap rights: an attempt needs no ConfigMap to exist."""
    run = _run()
    job = manifests.job(run, _spec(run), SETTINGS, attempt=1)
    assert "configMap" not in json.dumps(job["spec"]["template"]["spec"])


def test_each_attempt_keeps_the_spec_it_was_built_from() -> None:
    """A Job's template is immutable and carries its attempt's run config: an edit reaches the next attempt's
    Job only, and a restarted operator reads the running attempt's spec back from its Job."""
    first = _run()
    edited = {**first, "metadata": {**first["metadata"], "generation": 3},
              "spec": {"data": {"train": "s3://data/train.csv"}, "training": {"learningRate": 2e-6}}}
    job1 = manifests.job(first, _spec(first), SETTINGS, attempt=1)
    job2 = manifests.job(edited, _spec(edited), SETTINGS, attempt=2)
    spec1, generation1 = manifests.applied_spec(job1)
    spec2, generation2 = manifests.applied_spec(job2)
    assert (generation1, generation2) == (2, 3)
    assert spec1 == manifests.resolve_spec(_spec(first), SETTINGS) and spec1.training.learning_rate == 1e-5
    assert spec2 is not None and spec2.training.learning_rate == 2e-6


@pytest.mark.parametrize("job", [None, {}, {"spec": {"template": {"metadata": {"annotations": {}}}}},
                                 {"spec": {"template": {"metadata": {"annotations": {
                                     manifests.CONFIG_ANNOTATION: "{not json"}}}}}],
                         ids=["no Job", "empty", "an older operator's Job (ConfigMap)", "unreadable"])
def test_a_job_without_a_readable_config_has_no_applied_spec(job: Any) -> None:
    assert manifests.applied_spec(job) == (None, None)


def _largest_open_clip_config() -> dict[str, Any]:
    """The largest model config open_clip ships (read without importing open_clip, and torch with it)."""
    found = importlib.util.find_spec("open_clip")
    if found is None or found.origin is None:
        pytest.skip("open_clip is not installed")
    configs = sorted((Path(found.origin).parent / "model_configs").glob("*.json"), key=lambda p: p.stat().st_size)
    return dict(json.loads(configs[-1].read_text()))


def _largest_realistic_spec() -> dict[str, Any]:
    """Every field the schema bounds at its bound (URIs of 2 KiB, 64 zero-shot templates of 200 characters, 32
    tolerations, ...), the largest open_clip model config as a custom config, and 16 node labels."""
    uri = "s3://bucket/" + "d" * 2036
    return {
        "model": {"name": "m" * 200, "config": _largest_open_clip_config(), "pretrained": "random"},
        "data": {"train": uri, "eval": uri, "query": uri, "index": uri, "reference": uri, "zeroShot": uri,
                 "textColumn": "t" * 100, "imageColumn": "i" * 100},
        "training": {"maxSteps": 10**9, "gradClipNorm": 1.0},
        "callbacks": {
            "evaluation": {"zeroShotTemplates": ["{}" + "x" * 198] * 64, "maxQueries": 10**9},
            "bestModel": {"monitor": "m" * 100}, "earlyStopping": {"monitor": "m" * 100},
            "wiseFt": {"sweep": [i / 20 for i in range(21)], "metric": "m" * 100},
            "wandb": {"project": "p" * 128, "entity": "e" * 128, "runName": "r" * 128,
                      "apiKeySecret": {"name": "s" * 253, "key": "k" * 253}},
            "mlflow": {"trackingUri": "http://mlflow/" + "u" * 2030, "experiment": "e" * 256, "runName": "r" * 250}},
        "output": {"endpoint": "http://" + "h" * 2000, "bucket": "b" * 63, "prefix": "p" * 1024, "region": "r" * 64,
                   "credentialsSecret": {"name": "s" * 253, "accessKeyKey": "a" * 253, "secretKeyKey": "k" * 253}},
        "resources": {"image": "i" * 1024, "priorityClassName": "p" * 253, "imagePullSecrets": ["s" * 253] * 16,
                      "nodeSelector": {f"example.com/label-{i:02}" + "k" * 40: "v" * 63 for i in range(16)},
                      "tolerations": [{"key": "k" * 316, "operator": "Equal", "value": "v" * 63,
                                       "effect": "NoExecute", "tolerationSeconds": 10**9}] * 32},
        "runPolicy": {"activeDeadlineSeconds": 10**9, "ttlSecondsAfterFinished": 10**9},
        "queueName": "q" * 63,
    }


def test_the_largest_realistic_spec_fits_the_pod_template_annotations_with_room() -> None:
    run = _run(name="n" * 253, spec=_largest_realistic_spec())
    size = manifests.config_bytes(run, _spec(run), SETTINGS)
    # measured: 59.6 KB, a quarter of the 224 KiB budget; a typical run's is 1.5 KB
    assert size < manifests.CONFIG_BUDGET // 3, size
    assert admission_refusal(run, _spec(run), SETTINGS) is None
    typical = _run()
    assert manifests.config_bytes(typical, _spec(typical), SETTINGS) < 2048


def test_a_run_config_too_large_for_the_pod_template_is_refused_with_its_size() -> None:
    huge = _run(spec={"data": {"train": "s3://d/t.csv"},
                      "model": {"name": "custom", "config": {"blob": "x" * manifests.CONFIG_BUDGET}}})
    refusal = admission_refusal(huge, _spec(huge), SETTINGS)
    assert refusal is not None and refusal.reason == "ConfigTooLarge"
    size = manifests.config_bytes(huge, _spec(huge), SETTINGS)
    assert size > manifests.CONFIG_BUDGET
    assert f"the run config is {size} bytes, more than the {manifests.CONFIG_BUDGET}" in refusal.message
    assert manifests.CONFIG_BUDGET < manifests.ANNOTATIONS_LIMIT == 256 * 1024


def test_scratch_disk_is_the_emptydir_size_limit_and_the_ephemeral_storage_request_and_limit() -> None:
    for spec, expected in ((None, "20Gi"), ("75Gi", "75Gi")):
        run = _run(spec={"data": {"train": "s3://d/t.csv"}, "resources": {"ephemeralStorage": spec} if spec else {}})
        job = manifests.job(run, _spec(run), SETTINGS, attempt=1)
        resources = _container(job)["resources"]
        assert resources["requests"]["ephemeral-storage"] == resources["limits"]["ephemeral-storage"] == expected
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        (tmp,) = [m for m in _container(job)["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert volumes[tmp["name"]]["emptyDir"] == {"sizeLimit": expected}
        assert _config(job)["spec"]["resources"]["ephemeralStorage"] == expected  # the resolved config says so
    other_default = OperatorSettings(ephemeral_storage="5Gi")
    plain = _run()
    assert _container(manifests.job(plain, _spec(plain), other_default, attempt=1))["resources"]["limits"][
        "ephemeral-storage"] == "5Gi"
    with pytest.raises(ValueError, match="ephemeralStorage"):
        FinetuneRunSpec.model_validate({"data": {"train": "s3://d/t.csv"}, "resources": {"ephemeralStorage": "lots"}})


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
    assert set(volumes["config"]) == {"name", "downwardAPI"}


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
    assert res["requests"] == {"cpu": "8", "memory": "32Gi", "ephemeral-storage": "20Gi"}
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


POLICY_ENV = {"KUBETUNE_ALLOWED_IMAGES": '["registry.example.com/ml/*", "ghcr.io/team/trainer:*"]',
              "KUBETUNE_ALLOWED_PRIORITY_CLASSES": '["batch-low"]', "KUBETUNE_ALLOWED_TOLERATION_KEYS": '["team"]',
              "KUBETUNE_MAX_GPUS_PER_RUN": "4"}


def test_settings_platform_allow_list_from_env() -> None:
    from kubetune.lifecycle.policy import PlatformPolicy

    s = OperatorSettings.from_env({**POLICY_ENV, **GPU_ENV, "KUBETUNE_TRAINER_IMAGE": "kubetune/trainer:test"})
    # The operator's own defaults (its trainer image, its GPU tolerations) are the platform's: always allowed.
    assert s.platform_policy() == PlatformPolicy(
        images=("registry.example.com/ml/*", "ghcr.io/team/trainer:*", "kubetune/trainer:test"),
        priority_classes=("batch-low",), toleration_keys=("team", "nvidia.com/gpu", "spot"), max_gpus=4)
    unset = {name: "" for name in POLICY_ENV}
    assert OperatorSettings.from_env(unset).platform_policy() == PlatformPolicy()  # empty: anything
    assert OperatorSettings().platform_policy() == PlatformPolicy()
    for bad, match in [({"KUBETUNE_ALLOWED_IMAGES": '["registry.example.com*"]'},
                        r"KUBETUNE_ALLOWED_IMAGES: 'registry.example.com\*': a '\*' may only end the pattern"),
                       ({"KUBETUNE_ALLOWED_IMAGES": '"registry.example.com/ml/*"'}, "JSON array of strings"),
                       ({"KUBETUNE_ALLOWED_PRIORITY_CLASSES": "[1]"}, "got a number in it"),
                       ({"KUBETUNE_ALLOWED_TOLERATION_KEYS": '[""]'}, "empty name allows nothing"),
                       ({"KUBETUNE_MAX_GPUS_PER_RUN": "-1"}, "KUBETUNE_MAX_GPUS_PER_RUN: .*greater than or equal")]:
        with pytest.raises(ValueError, match=match):
            OperatorSettings.from_env(bad)


def test_a_spec_read_back_from_its_job_is_admitted_again_under_a_strict_allow_list() -> None:
    """After a restart the supervisor may go on with the spec in the running attempt's Job, which has the
    operator's defaults filled in: they must not make the run fail its admission."""
    strict = OperatorSettings.from_env({**POLICY_ENV, **GPU_ENV, "KUBETUNE_TRAINER_IMAGE": "kubetune/trainer:test"})
    run = _run(spec={"data": {"train": "s3://d/t.csv"}, "resources": {"gpus": 2}})
    assert admission_refusal(run, _spec(run), strict) is None
    applied, _ = manifests.applied_spec(manifests.job(run, _spec(run), strict, attempt=1))
    assert applied is not None and applied.resources.image == "kubetune/trainer:test"
    assert len(applied.resources.tolerations) == 2  # the GPU defaults
    assert admission_refusal(run, applied, strict) is None
    greedy = _run(spec={"data": {"train": "s3://d/t.csv"}, "resources": {"gpus": 8, "image": "evil/miner:1"}})
    refusal = admission_refusal(greedy, _spec(greedy), strict)
    assert refusal is not None and [path for path, _ in refusal.errors] == ["spec.resources.image",
                                                                            "spec.resources.gpus"]


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
    doc = _config(manifests.job(own, _spec(own), settings, attempt=1))
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


# ------------------------------------------------------------------------------------ runs over several pods
OLD = Capabilities(1, 20)
NEW = Capabilities(1, 29)


def _gang_run(nodes: int = 3, name: str = "clip-ft") -> dict[str, Any]:
    return _run(name, {"data": {"train": "s3://data/train.csv"}, "resources": {"gpus": 2, "nodes": nodes},
                       "queueName": "team-a-queue"})


def _env(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(job)["env"]}


def test_one_pod_runs_keep_one_plain_job() -> None:
    run = _run()
    for capabilities in (OLD, NEW, None):
        assert manifests.gang_mode(_spec(run), capabilities) == "single"
        job = manifests.job(run, _spec(run), SETTINGS, attempt=1, capabilities=capabilities)
        assert "completionMode" not in job["spec"] and job["spec"]["completions"] == 1
        assert "KUBETUNE_NODE_RANK" not in _env(job) and "ports" not in _container(job)


def test_old_servers_get_one_job_per_node_rank_behind_a_service_address() -> None:
    run = _gang_run()
    spec = _spec(run)
    assert manifests.gang_mode(spec, OLD) == "per-node"
    rank0 = manifests.job(run, spec, SETTINGS, attempt=2, capabilities=OLD)
    rank0["metadata"]["uid"] = "job-uid"
    service = manifests.rendezvous_service(run, 2, "per-node", rank0)
    assert service["metadata"]["name"] == "kt-clip-ft-a2" and "clusterIP" not in service["spec"]
    assert service["spec"]["selector"] == {manifests.RUN_LABEL: "clip-ft", manifests.ATTEMPT_LABEL: "2",
                                           manifests.NODE_RANK_LABEL: "0"}
    assert service["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job",
                                                       "name": "clip-ft-a2", "uid": "job-uid"}]
    address = manifests.rendezvous_address(run, 2, "per-node", "10.96.0.42")
    assert address == "10.96.0.42:29500" and manifests.rendezvous_address(run, 2, "per-node", None) is None
    others = [manifests.job(run, spec, SETTINGS, attempt=2, capabilities=OLD, node_rank=r, rendezvous=address)
              for r in (1, 2)]
    assert [j["metadata"]["name"] for j in [rank0, *others]] == ["clip-ft-a2", "clip-ft-a2-n1", "clip-ft-a2-n2"]
    for rank, job in enumerate([rank0, *others]):
        pod_labels = job["spec"]["template"]["metadata"]["labels"]
        job_labels = job["metadata"]["labels"]
        assert pod_labels[manifests.NODE_RANK_LABEL] == job_labels[manifests.NODE_RANK_LABEL] == str(rank)
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1
        assert _env(job)["KUBETUNE_NODE_RANK"] == str(rank)
        assert _env(job).get("KUBETUNE_RENDEZVOUS") == (address if rank else None)
        assert _container(job)["ports"] == [{"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"}]
        assert "podFailurePolicy" not in job["spec"]  # the unit is retried as a whole, never one pod
        assert job["metadata"]["labels"][manifests.QUEUE_LABEL] == "team-a-queue"
        assert _container(job)["resources"]["limits"]["nvidia.com/gpu"] == "2"  # each pod: the spec's resources


def test_new_servers_get_one_indexed_job_under_a_headless_service() -> None:
    run = _gang_run(nodes=4)
    spec = _spec(run)
    assert manifests.gang_mode(spec, NEW) == "indexed"
    job = manifests.job(run, spec, SETTINGS, attempt=1, capabilities=NEW)
    assert job["metadata"]["name"] == "clip-ft-a1"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    assert job["spec"]["template"]["spec"]["subdomain"] == "kt-clip-ft-a1"
    assert manifests.NODE_RANK_LABEL not in job["spec"]["template"]["metadata"]["labels"]
    env = _env(job)
    assert env["KUBETUNE_NODE_RANK"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert env["KUBETUNE_RENDEZVOUS"] == "clip-ft-a1-0.kt-clip-ft-a1:29500"
    job["metadata"]["uid"] = "u"
    service = manifests.rendezvous_service(run, 1, "indexed", job)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert manifests.NODE_RANK_LABEL not in service["spec"]["selector"]


def test_service_names_are_dns_labels_whatever_the_run_name() -> None:
    names = {}
    for name in ("9lives", "a.b", "a-b", "x" * 253, "x." * 100 + "y"):
        names[name] = manifests.rendezvous_service(_gang_run(name=name), 3, "per-node",
                                                   {"metadata": {"name": "j", "uid": "u"}})["metadata"]["name"]
        assert len(names[name]) <= 63 and names[name][0].isalpha() and "." not in names[name], name
    assert len(set(names.values())) == len(names)


@pytest.mark.parametrize(("resources", "threads"), [
    ({"cpu": "4", "gpus": 0}, "4"), ({"cpu": "2", "gpus": 0, "procsPerNode": 2}, "1"),
    ({"cpu": "500m", "gpus": 0}, "1"), ({"cpu": "8", "gpus": 4}, "2"), ({"cpu": "1", "gpus": 0, "nodes": 2}, "1"),
    ({"cpu": "3.5", "gpus": 1}, "3"),
])
def test_each_process_gets_its_share_of_the_pod_cpu_as_threads(resources: dict[str, Any], threads: str) -> None:
    run = _run(spec={"data": {"train": "s3://data/train.csv"}, "resources": resources})
    assert _env(manifests.job(run, _spec(run), SETTINGS, attempt=1, capabilities=OLD))["OMP_NUM_THREADS"] == threads
