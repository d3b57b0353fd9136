"""Pure builders: a FinetuneRun → the children the operator owns (a ConfigMap and one Job per attempt).

No I/O, no Kubernetes client, no kopf: every function takes plain dicts / models and returns dicts that can be
sent to the API server as they are (and compared in unit tests).

Design:
- **One Job per attempt**, deterministic name ``<run>-a<N>`` (:func:`job_name`). The Job has
  ``backoffLimit: 0``; the operator decides about retries from the trainer's exit code (retryable: new attempt
  Job that resumes from the latest checkpoint; permanent: fail fast). A deterministic name makes creation
  idempotent: an operator restarted between "create Job" and "record it in status" gets 409 and adopts it,
  so there is never a duplicate Job.
- The resolved run config (spec with defaults applied and the operator's defaults filled in) goes into a
  ConfigMap at key ``run.yaml``, mounted read-only at ``/etc/kubetune/run.yaml``. It is written as JSON,
  which is valid YAML: ``yaml.safe_load`` and ``json.load`` both read it.
- S3 credentials reach the trainer through ``secretKeyRef`` only: the operator never reads Secret values.
- Runs that request GPUs get the operator's GPU placement defaults (``OperatorSettings.gpu_node_selector`` and
  ``gpu_tolerations``, from the chart's ``runDefaults.gpu``): node selectors are merged (the run's own value wins
  for a key both set), default tolerations are appended after the run's own (duplicates skipped).
- The trainer's ``KUBETUNE_*`` variables come from one contract, :class:`kubetune.api.trainer_env.TrainerEnv`.
  Its final events go to the container's termination message, so the operator reads the result from the pod's
  status even when the pod's log is gone.
- Hardened pod: non-root, read-only root filesystem (emptyDir for /tmp and /dev/shm), no privilege escalation,
  all capabilities dropped, seccomp RuntimeDefault, no service-account token.
"""

from __future__ import annotations

import json
from typing import Any

from kubetune.api.names import (
    ATTEMPT_LABEL,
    RUN_LABEL,
    RUN_NAME_ANNOTATION,
    RUN_UID_ANNOTATION,
    config_map_name,
    job_name,
    run_label,
)
from kubetune.api.spec import API_VERSION, KIND, FinetuneRunSpec, ResourcesSpec, SecretRef, Toleration
from kubetune.api.trainer_env import DEFAULT_TERMINATION_LOG, TrainerEnv
from kubetune.operator.settings import Capabilities, OperatorSettings

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GPU_RESOURCE = "nvidia.com/gpu"
CONFIG_KEY = "run.yaml"
CONFIG_DIR = "/etc/kubetune"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
CONTAINER_NAME = "trainer"
# The trainer writes its final events there (kubetune.api.events.termination_message); FallbackToLogsOnError puts
# the log's tail there instead when a crashed trainer wrote nothing.
TERMINATION_MESSAGE_PATH = DEFAULT_TERMINATION_LOG
MANAGED_BY = "kubetune-operator"

def owner_reference(run: dict[str, Any]) -> dict[str, Any]:
    """Controller owner reference to the run: children are garbage-collected with it."""
    meta = run["metadata"]
    return {"apiVersion": run.get("apiVersion", API_VERSION), "kind": run.get("kind", KIND),
            "name": meta["name"], "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def labels(run: dict[str, Any], attempt: int | None = None) -> dict[str, str]:
    out = {
        RUN_LABEL: run_label(run["metadata"]["name"]),
        "app.kubernetes.io/name": "kubetune-trainer",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }
    if attempt is not None:
        out[ATTEMPT_LABEL] = str(attempt)
    return out


def run_annotations(run: dict[str, Any]) -> dict[str, str]:
    meta = run["metadata"]
    return {RUN_NAME_ANNOTATION: meta["name"], RUN_UID_ANNOTATION: meta["uid"]}


def gpu_placement(resources: ResourcesSpec, settings: OperatorSettings) -> dict[str, Any]:
    """Node selector and tolerations of a run's pod: the run's own, plus the operator's GPU defaults when the run
    requests GPUs. Node selectors merge (the run's value wins for a key both set); default tolerations are
    appended after the run's own, skipping ones the run already has."""
    node_selector = dict(resources.node_selector)
    tolerations = list(resources.tolerations)
    if resources.gpus > 0:
        node_selector = {**settings.gpu_node_selector, **node_selector}
        for raw in settings.gpu_tolerations:
            toleration = Toleration.model_validate(dict(raw))
            if toleration not in tolerations:
                tolerations.append(toleration)
    return {"node_selector": node_selector, "tolerations": tolerations}


def resolve_spec(spec: FinetuneRunSpec, settings: OperatorSettings) -> FinetuneRunSpec:
    """The spec with the operator's defaults filled in (image, pull policy, S3 endpoint/bucket/secret, GPU
    node selector and tolerations)."""
    output = spec.output.model_copy(update={
        "endpoint": spec.output.endpoint or settings.s3_endpoint,
        "bucket": spec.output.bucket or settings.s3_bucket,
    })
    if output.credentials_secret is None and settings.s3_secret:
        output = output.model_copy(update={"credentials_secret": SecretRef(name=settings.s3_secret)})
    resources = spec.resources.model_copy(update={
        "image": spec.resources.image or settings.trainer_image,
        "image_pull_policy": spec.resources.image_pull_policy or settings.image_pull_policy,
        **gpu_placement(spec.resources, settings),
    })
    return spec.model_copy(update={"output": output, "resources": resources})


def run_config(run: dict[str, Any], spec: FinetuneRunSpec, settings: OperatorSettings) -> dict[str, Any]:
    """The document the trainer reads from /etc/kubetune/run.yaml: a FinetuneRun with the resolved spec
    (``FinetuneRunSpec.model_validate(doc["spec"])`` reads it back)."""
    meta = run["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
                     "generation": meta.get("generation", 1)},
        "spec": resolve_spec(spec, settings).dump(),
    }


def config_map(run: dict[str, Any], spec: FinetuneRunSpec, settings: OperatorSettings) -> dict[str, Any]:
    meta = run["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": labels(run),
            "annotations": run_annotations(run),
            "ownerReferences": [owner_reference(run)],
        },
        # JSON is valid YAML: the trainer reads it with yaml.safe_load, stdlib-only tools with json.load.
        "data": {CONFIG_KEY: json.dumps(run_config(run, spec, settings), indent=2, allow_nan=False) + "\n"},
    }


def trainer_env(run: dict[str, Any], attempt: int, resume_from: str | None,
                model_mirror: str | None = None) -> TrainerEnv:
    """The trainer's ``KUBETUNE_*`` contract for one attempt (:mod:`kubetune.api.trainer_env`)."""
    meta = run["metadata"]
    return TrainerEnv(config=CONFIG_PATH, run_name=meta["name"], run_namespace=meta["namespace"],
                      run_uid=meta["uid"], attempt=attempt, resume_from=resume_from or None,
                      termination_log=TERMINATION_MESSAGE_PATH, model_mirror=model_mirror)


def _env(run: dict[str, Any], spec: FinetuneRunSpec, attempt: int, resume_from: str | None,
         model_mirror: str | None = None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        *trainer_env(run, attempt, resume_from, model_mirror).to_env(),
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
        {"name": "HF_HOME", "value": "/tmp/.cache/huggingface"},
        {"name": "AWS_REGION", "value": spec.output.region},
        {"name": "AWS_DEFAULT_REGION", "value": spec.output.region},
    ]
    if spec.output.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.output.endpoint})
    secret = spec.output.credentials_secret
    if secret is not None:
        env.append({"name": "AWS_ACCESS_KEY_ID",
                    "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.access_key_key}}})
        env.append({"name": "AWS_SECRET_ACCESS_KEY",
                    "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.secret_key_key}}})
    wandb = spec.callbacks.wandb
    if wandb is not None and wandb.api_key_secret is not None:
        # the variable W&B's client reads its key from; with mode auto it also turns online logging on
        env.append({"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": wandb.api_key_secret.name, "key": wandb.api_key_secret.key}}})
    return env


def _resources(spec: FinetuneRunSpec) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    limits = dict(amounts)
    if spec.resources.gpus > 0:
        limits[GPU_RESOURCE] = str(spec.resources.gpus)
    return {"requests": amounts, "limits": limits}


def job(run: dict[str, Any], spec: FinetuneRunSpec, settings: OperatorSettings, *, attempt: int,
        resume_from: str | None = None, active_deadline_seconds: int | None = None,
        capabilities: Capabilities | None = None) -> dict[str, Any]:
    """The batch/v1 Job of one attempt.

    ``active_deadline_seconds`` is what is left of the run's ``activeDeadlineSeconds`` (the operator computes
    it from the run's start time so that retries do not extend the deadline).
    """
    meta = run["metadata"]
    resolved = resolve_spec(spec, settings)
    res = resolved.resources
    job_labels = labels(run, attempt)
    if resolved.queue_name:
        job_labels[QUEUE_LABEL] = resolved.queue_name
    pod_labels = labels(run, attempt)
    uid = settings.run_as_user
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [{
            "name": CONTAINER_NAME,
            "image": res.image,
            "imagePullPolicy": res.image_pull_policy,
            "env": _env(run, resolved, attempt, resume_from, settings.model_mirror),
            "resources": _resources(resolved),
            "terminationMessagePath": TERMINATION_MESSAGE_PATH,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": [
                {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "dshm", "mountPath": "/dev/shm"},
            ],
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "privileged": False,
                "runAsNonRoot": True,
                "capabilities": {"drop": ["ALL"]},
            },
        }],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(meta["name"]),
                                             "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
        ],
    }
    if settings.trainer_service_account:
        pod_spec["serviceAccountName"] = settings.trainer_service_account
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.dump() for t in res.tolerations]
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    if res.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in res.image_pull_secrets]
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "completions": 1,
        "parallelism": 1,
        "template": {"metadata": {"labels": pod_labels, "annotations": run_annotations(run)}, "spec": pod_spec},
    }
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = max(1, int(active_deadline_seconds))
    if capabilities is not None and capabilities.pod_failure_policy:
        # Evictions/preemptions do not fail the attempt: the Job controller starts a new pod, which resumes
        # from the latest checkpoint. Permanent trainer exits fail the Job at once.
        job_spec["podFailurePolicy"] = {"rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In",
                                                  "values": [65, 78]}},
        ]}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(meta["name"], attempt),
            "namespace": meta["namespace"],
            "labels": job_labels,
            "annotations": run_annotations(run),
            "ownerReferences": [owner_reference(run)],
        },
        "spec": job_spec,
    }
