"""The operator's settings (``KUBETUNE_*`` environment, pydantic-settings): types, defaults, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import pytest
from kubetune.operator.settings import OperatorSettings, variable
from pydantic import ValidationError

pytestmark = pytest.mark.unit

DEFAULTS: dict[str, Any] = {
    "trainer_image": "kubetune/trainer:0.1.0",
    "image_pull_policy": "IfNotPresent",
    "s3_endpoint": None,
    "s3_bucket": "kubetune",
    "s3_secret": "kubetune-s3",
    "model_mirror": None,
    "trainer_service_account": None,
    "run_as_user": 10001,
    "shm_size": "1Gi",
    "termination_grace_seconds": 60,
    "status_interval": 1.0,
    "status_qps": 50.0,
    "ttl_check_interval": 30.0,
    "gpu_node_selector": {},
    "gpu_tolerations": [],
    "ephemeral_storage": "20Gi",
    "allowed_images": [],
    "allowed_priority_classes": [],
    "allowed_toleration_keys": [],
    "max_gpus_per_run": None,
}
GPU = '{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}'


def plain(settings: OperatorSettings) -> dict[str, Any]:
    """Field values with the read-only mappings as dicts and the tolerations as a list (comparable to JSON)."""
    out = {}
    for name in OperatorSettings.model_fields:
        value = getattr(settings, name)
        if isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, tuple):
            value = [dict(v) for v in value]
        out[name] = value
    return out


def test_defaults() -> None:
    assert set(DEFAULTS) == set(OperatorSettings.model_fields)
    assert plain(OperatorSettings.from_env({})) == DEFAULTS
    assert OperatorSettings.from_env({}) == OperatorSettings()


@pytest.mark.parametrize(("name", "raw", "field", "expected"), [
    # int
    ("KUBETUNE_RUN_AS_USER", "2000", "run_as_user", 2000),
    ("KUBETUNE_TERMINATION_GRACE_SECONDS", " 30 ", "termination_grace_seconds", 30),
    # float (an integer literal is a float too)
    ("KUBETUNE_STATUS_INTERVAL", "2.5", "status_interval", 2.5),
    ("KUBETUNE_STATUS_QPS", "10", "status_qps", 10.0),
    ("KUBETUNE_TTL_CHECK_INTERVAL", "1e1", "ttl_check_interval", 10.0),
    # str
    ("KUBETUNE_TRAINER_IMAGE", "registry.example/trainer:9", "trainer_image", "registry.example/trainer:9"),
    ("KUBETUNE_S3_BUCKET", "models", "s3_bucket", "models"),
    ("KUBETUNE_SHM_SIZE", "2Gi", "shm_size", "2Gi"),
    ("KUBETUNE_IMAGE_PULL_POLICY", "Always", "image_pull_policy", "Always"),
    # optional str: empty is none
    ("KUBETUNE_S3_ENDPOINT", "http://minio:9000", "s3_endpoint", "http://minio:9000"),
    ("KUBETUNE_S3_ENDPOINT", "", "s3_endpoint", None),
    ("KUBETUNE_S3_SECRET", "s3creds", "s3_secret", "s3creds"),
    ("KUBETUNE_S3_SECRET", "", "s3_secret", None),
    ("KUBETUNE_MODEL_MIRROR", "s3://models/mirror", "model_mirror", "s3://models/mirror"),
    ("KUBETUNE_MODEL_MIRROR", "", "model_mirror", None),
    ("KUBETUNE_TRAINER_SERVICE_ACCOUNT", "trainer", "trainer_service_account", "trainer"),
    ("KUBETUNE_TRAINER_SERVICE_ACCOUNT", "", "trainer_service_account", None),
    # JSON object; empty and null: no defaults
    ("KUBETUNE_GPU_NODE_SELECTOR", '{"nvidia.com/gpu.present": "true", "Pool": "a100"}', "gpu_node_selector",
     {"nvidia.com/gpu.present": "true", "Pool": "a100"}),
    ("KUBETUNE_GPU_NODE_SELECTOR", "", "gpu_node_selector", {}),
    ("KUBETUNE_GPU_NODE_SELECTOR", "null", "gpu_node_selector", {}),
    # JSON array of Kubernetes tolerations, kept as given (camelCase keys)
    ("KUBETUNE_GPU_TOLERATIONS", f'[{GPU}, {{"key": "spot", "operator": "Equal", "value": "yes", '
                                 '"effect": "NoExecute", "tolerationSeconds": 30}]', "gpu_tolerations",
     [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
      {"key": "spot", "operator": "Equal", "value": "yes", "effect": "NoExecute", "tolerationSeconds": 30}]),
    ("KUBETUNE_GPU_TOLERATIONS", "[]", "gpu_tolerations", []),
    ("KUBETUNE_GPU_TOLERATIONS", " ", "gpu_tolerations", []),
])
def test_each_variable_is_typed(name: str, raw: str, field: str, expected: Any) -> None:
    assert variable(field) == name
    values = plain(OperatorSettings.from_env({name: raw}))
    assert values[field] == expected and type(values[field]) is type(expected)
    assert {k: v for k, v in values.items() if k != field} == {k: v for k, v in DEFAULTS.items() if k != field}


@pytest.mark.parametrize(("env", "reason"), [
    ({"KUBETUNE_RUN_AS_USER": "ten"}, r"^KUBETUNE_RUN_AS_USER: .*integer.*'ten'"),
    ({"KUBETUNE_RUN_AS_USER": "1.5"}, r"^KUBETUNE_RUN_AS_USER: .*integer"),
    ({"KUBETUNE_RUN_AS_USER": "-1"}, r"^KUBETUNE_RUN_AS_USER: .*greater than or equal to 0"),
    ({"KUBETUNE_TERMINATION_GRACE_SECONDS": ""}, r"^KUBETUNE_TERMINATION_GRACE_SECONDS: .*integer"),
    ({"KUBETUNE_STATUS_QPS": "0"}, r"^KUBETUNE_STATUS_QPS: .*greater than 0"),
    ({"KUBETUNE_STATUS_INTERVAL": "nan"}, r"^KUBETUNE_STATUS_INTERVAL: .*finite"),
    ({"KUBETUNE_TTL_CHECK_INTERVAL": "soon"}, r"^KUBETUNE_TTL_CHECK_INTERVAL: .*number.*'soon'"),
    ({"KUBETUNE_IMAGE_PULL_POLICY": "Sometimes"}, r"^KUBETUNE_IMAGE_PULL_POLICY: .*'IfNotPresent'.*'Sometimes'"),
    ({"KUBETUNE_TRAINER_IMAGE": ""}, r"^KUBETUNE_TRAINER_IMAGE: .*at least 1 character"),
    ({"KUBETUNE_S3_BUCKET": ""}, r"^KUBETUNE_S3_BUCKET: "),
    ({"KUBETUNE_SHM_SIZE": "lots"}, r"^KUBETUNE_SHM_SIZE: .*pattern.*'lots'"),
    ({"KUBETUNE_MODEL_MIRROR": "http://minio:9000/models"}, r"^KUBETUNE_MODEL_MIRROR: expected s3://"),
    ({"KUBETUNE_GPU_NODE_SELECTOR": "{nope"}, r"^KUBETUNE_GPU_NODE_SELECTOR: not JSON"),
    ({"KUBETUNE_GPU_NODE_SELECTOR": '["a"]'}, r"^KUBETUNE_GPU_NODE_SELECTOR: expected a JSON object, got an array"),
    ({"KUBETUNE_GPU_NODE_SELECTOR": '{"pool": true}'}, r'^KUBETUNE_GPU_NODE_SELECTOR\["pool"\]: .*valid string'),
    ({"KUBETUNE_GPU_NODE_SELECTOR": '{"": "x"}'}, r"^KUBETUNE_GPU_NODE_SELECTOR: .*must not be empty"),
    ({"KUBETUNE_GPU_TOLERATIONS": "[{"}, r"^KUBETUNE_GPU_TOLERATIONS: not JSON"),
    ({"KUBETUNE_GPU_TOLERATIONS": GPU}, r"^KUBETUNE_GPU_TOLERATIONS: expected a JSON array of objects, got an obj"),
    ({"KUBETUNE_GPU_TOLERATIONS": f'[{GPU}, "x"]'}, r"^KUBETUNE_GPU_TOLERATIONS\[1\]: .*dictionary"),
    ({"KUBETUNE_GPU_TOLERATIONS": '[{"operator": "Maybe"}]'}, r"^KUBETUNE_GPU_TOLERATIONS\[0\]: operator: "),
    ({"KUBETUNE_GPU_TOLERATIONS": '[{"key": "a", "effect": "Sometimes"}]'},
     r"^KUBETUNE_GPU_TOLERATIONS\[0\]: effect: .*'NoSchedule'.*'Sometimes'"),
    ({"KUBETUNE_GPU_TOLERATIONS": '[{"key": "a", "tolerations": 3}]'}, r"^KUBETUNE_GPU_TOLERATIONS\[0\]: toleratio"),
])
def test_an_invalid_value_names_the_variable(env: dict[str, str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as raised:
        OperatorSettings.from_env(env)
    assert type(raised.value) is ValueError and "\n" not in str(raised.value)


def test_every_invalid_variable_is_named_on_one_line() -> None:
    with pytest.raises(ValueError) as raised:
        OperatorSettings.from_env({"KUBETUNE_RUN_AS_USER": "x", "KUBETUNE_STATUS_QPS": "-1",
                                   "KUBETUNE_GPU_TOLERATIONS": '[{"effect": "Sometimes"}]'})
    message = str(raised.value)
    assert "\n" not in message
    for name in ("KUBETUNE_RUN_AS_USER", "KUBETUNE_STATUS_QPS", "KUBETUNE_GPU_TOLERATIONS[0]"):
        assert name in message


def test_other_variables_are_ignored() -> None:
    # KUBETUNE_NAMESPACE belongs to the CLI, KUBETUNE_CONFIG to the trainer: neither is an operator setting.
    assert OperatorSettings.from_env({"KUBETUNE_NAMESPACE": "x", "KUBETUNE_CONFIG": "/x", "OTHER": "1"}) \
        == OperatorSettings()


def test_only_from_env_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "from/env:1")
    monkeypatch.setenv("KUBETUNE_GPU_NODE_SELECTOR", '{"pool": "gpu"}')
    assert OperatorSettings().trainer_image == DEFAULTS["trainer_image"]
    assert OperatorSettings(s3_secret=None).gpu_node_selector == {}
    from_os = OperatorSettings.from_env()
    assert from_os.trainer_image == "from/env:1" and dict(from_os.gpu_node_selector) == {"pool": "gpu"}
    assert OperatorSettings.from_env({}).trainer_image == DEFAULTS["trainer_image"]  # an explicit mapping only


def test_read_only() -> None:
    settings = OperatorSettings.from_env({"KUBETUNE_GPU_NODE_SELECTOR": '{"a": "b"}',
                                          "KUBETUNE_GPU_TOLERATIONS": f"[{GPU}]"})
    with pytest.raises(ValidationError, match="frozen"):
        settings.trainer_image = "x"
    with pytest.raises(TypeError):
        settings.gpu_node_selector["a"] = "c"  # type: ignore[index]
    with pytest.raises(TypeError):
        settings.gpu_tolerations[0]["key"] = "c"  # type: ignore[index]


def test_fields_are_documented() -> None:
    for name, field in OperatorSettings.model_fields.items():
        assert field.description, f"{variable(name)} has no description"


def test_operator_reports_a_bad_variable_on_one_line() -> None:
    env = {**os.environ, "KUBETUNE_RUN_AS_USER": "ten", "KUBETUNE_GPU_NODE_SELECTOR": "{nope"}
    done = subprocess.run([sys.executable, "-m", "kubetune.operator", "--standalone", "--log-format=plain",
                           "--metrics-port=0", "--health-port=0"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("KUBETUNE_GPU_NODE_SELECTOR: not JSON"), lines
