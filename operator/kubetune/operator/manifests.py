"""Pure builders: a FinetuneRun → the children the operator owns (one Job per attempt).

No I/O, no Kubernetes client, no kopf: every function takes plain dicts / models and returns dicts that can be
sent to the API server as they are (and compared in unit tests).

Design:
- **One Job per attempt**, deterministic name ``<run>-a<N>`` (:func:`job_name`). The Job has
  ``backoffLimit: 0``; the operator decides about retries from the trainer's exit code (retryable: new attempt
  Job that resumes from the latest checkpoint; permanent: fail fast). A deterministic name makes creation
  idempotent: an operator restarted between "create Job" and "record it in status" gets 409 and adopts it,
  so there is never a duplicate Job.
- The resolved run config (spec with defaults applied and the operator's defaults filled in) goes into the
  attempt's pod template, annotation ``kubetune.io/run-config``, which a downward API volume shows the trainer
  as ``/etc/kubetune/run.yaml`` (read-only). So the operator needs no ConfigMap rights at all (in cluster-wide
  mode those would reach every namespace's ConfigMaps, kube-system's included), and the running attempt keeps
  its spec by construction: a Job's template is immutable. It is written as JSON, which is valid YAML:
  ``yaml.safe_load`` and ``json.load`` both read it. Annotations hold 256 KiB in all (:data:`CONFIG_BUDGET`):
  a run whose config does not fit is refused (``ConfigTooLarge``, :func:`config_bytes`) before any Job.
- The trainer's scratch ``/tmp`` is an emptyDir of ``spec.resources.ephemeralStorage`` (the operator's default
  when unset), which is also the container's ephemeral-storage request and limit: the scheduler places the pod
  on a node with that much disk, and the kubelet evicts a trainer that writes more instead of filling the node.
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
from collections.abc import Mapping
from typing import Any, Literal

from kubetune.api.names import (
    ATTEMPT_LABEL,
    COMPLETION_INDEX_ANNOTATION,
    NODE_RANK_LABEL,
    RUN_LABEL,
    RUN_NAME_ANNOTATION,
    RUN_UID_ANNOTATION,
    job_name,
    rendezvous_service_name,
    run_label,
    worker_job_name,
)
from kubetune.api.quantity import parse_quantity
from kubetune.api.spec import (
    API_VERSION,
    KIND,
    MLFLOW_CREDENTIAL_KEYS,
    FinetuneRunSpec,
    ResourcesSpec,
    SecretRef,
    Toleration,
)
from kubetune.api.trainer_env import DEFAULT_TERMINATION_LOG, RENDEZVOUS_PORT, TrainerEnv, variable
from kubetune.operator.settings import Capabilities, OperatorSettings

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GPU_RESOURCE = "nvidia.com/gpu"
CONFIG_KEY = "run.yaml"
CONFIG_DIR = "/etc/kubetune"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
CONFIG_ANNOTATION = "kubetune.io/run-config"
EPHEMERAL_STORAGE = "ephemeral-storage"
#: Kubernetes' cap on one object's annotations, keys and values together (apimachinery's
#: TotalAnnotationSizeLimitB).
ANNOTATIONS_LIMIT = 256 * 1024
#: What the operator puts in an attempt's pod template annotations may use; the rest is left to what mutating
#: admission webhooks (service meshes, policy engines) add to the pod.
CONFIG_BUDGET = ANNOTATIONS_LIMIT - 32 * 1024
CONTAINER_NAME = "trainer"
# The trainer writes its final events there (kubetune.api.events.termination_message); FallbackToLogsOnError puts
# the log's tail there instead when a crashed trainer wrote nothing.
TERMINATION_MESSAGE_PATH = DEFAULT_TERMINATION_LOG
MANAGED_BY = "kubetune-operator"
GangMode = Literal["single", "indexed", "per-node"]


def gang_mode(spec: FinetuneRunSpec, capabilities: Capabilities | None) -> GangMode:
    """How an attempt's pods are created: one pod (``single``); several as one Indexed Job (``indexed``, servers
    with Indexed Jobs on by default); or one single-pod Job per node rank (``per-node``, older servers)."""
    if spec.resources.nodes <= 1:
        return "single"
    return "indexed" if capabilities is not None and capabilities.indexed_job else "per-node"


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
        "ephemeral_storage": spec.resources.ephemeral_storage or settings.ephemeral_storage,
        **gpu_placement(spec.resources, settings),
    })
    return spec.model_copy(update={"output": output, "resources": resources})


def run_config(run: dict[str, Any], spec: FinetuneRunSpec, settings: OperatorSettings) -> dict[str, Any]:
    """The document the trainer reads from /etc/kubetune/run.yaml: a FinetuneRun with the resolved spec
    (``FinetuneRunSpec.model_validate(doc["spec"])`` reads it back, and :func:`applied_spec` from a Job)."""
    meta = run["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
                     "generation": meta.get("generation", 1)},
        "spec": resolve_spec(spec, settings).dump(),
    }


def pod_annotations(run: dict[str, Any], spec: FinetuneRunSpec, settings: OperatorSettings) -> dict[str, str]:
    """The attempt's pod template annotations: the run's name and uid, and its run config."""
    # JSON is valid YAML: the trainer reads it with yaml.safe_load, stdlib-only tools with json.load. One line,
    # ASCII only: every byte counts against the annotations' cap.
    config = json.dumps(run_config(run, spec, settings), separators=(", ", ": "), allow_nan=False)
    return {**run_annotations(run), CONFIG_ANNOTATION: config}


def annotations_size(annotations: Mapping[str, str]) -> int:
    """Bytes of ``annotations`` as the API server counts them against :data:`ANNOTATIONS_LIMIT`."""
    return sum(len(key.encode()) + len(value.encode()) for key, value in annotations.items())


def config_bytes(run: dict[str, Any], spec: FinetuneRunSpec, settings: OperatorSettings) -> int:
    """What the run's pod template annotations take; more than :data:`CONFIG_BUDGET` is refused."""
    return annotations_size(pod_annotations(run, spec, settings))


def applied_spec(job: Mapping[str, Any] | None) -> tuple[FinetuneRunSpec | None, int | None]:
    """The (resolved) spec and generation an attempt's Job was built from; (None, None) when ``job`` carries
    no readable run config (none given, or a Job of an operator that kept it in a ConfigMap)."""
    template = ((job or {}).get("spec") or {}).get("template") or {}
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    try:
        doc = json.loads(annotations[CONFIG_ANNOTATION])
        return FinetuneRunSpec.model_validate(doc["spec"]), (doc.get("metadata") or {}).get("generation")
    except (KeyError, TypeError, ValueError):
        return None, None


def trainer_env(run: dict[str, Any], attempt: int, resume_from: str | None,
                model_mirror: str | None = None, *, node_rank: int | None = None,
                rendezvous: str | None = None) -> TrainerEnv:
    """The trainer's ``KUBETUNE_*`` contract for one attempt (:mod:`kubetune.api.trainer_env`)."""
    meta = run["metadata"]
    return TrainerEnv(config=CONFIG_PATH, run_name=meta["name"], run_namespace=meta["namespace"],
                      run_uid=meta["uid"], attempt=attempt, resume_from=resume_from or None,
                      termination_log=TERMINATION_MESSAGE_PATH, model_mirror=model_mirror, node_rank=node_rank,
                      rendezvous=rendezvous)


def threads_per_process(resources: ResourcesSpec) -> int:
    """Each training process's CPU threads: the pod's CPU limit shared among its processes (at least 1). Left to
    itself, PyTorch starts a thread per core of the node, which a CPU limit then throttles; and the same global
    batch gives the same weights whether its processes share one pod or are spread over several only when each
    process computes with the same number of threads (float sums depend on their order)."""
    procs = resources.procs_per_node or max(1, resources.gpus)
    return max(1, int(parse_quantity(resources.cpu) // procs))


def _env(run: dict[str, Any], spec: FinetuneRunSpec, attempt: int, resume_from: str | None,
         model_mirror: str | None = None, *, mode: GangMode = "single", node_rank: int = 0,
         rendezvous: str | None = None) -> list[dict[str, Any]]:
    contract: list[dict[str, Any]] = list(trainer_env(
        run, attempt, resume_from, model_mirror, node_rank=None if mode == "single" else node_rank,
        rendezvous=rendezvous).to_env())
    if mode == "indexed":  # every pod of the Job has one template: the rank is the pod's completion index
        contract = [{"name": e["name"], "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}}
                    if e["name"] == variable("node_rank") else e for e in contract]
    env: list[dict[str, Any]] = [
        *contract,
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "OMP_NUM_THREADS", "value": str(threads_per_process(spec.resources))},
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
    mlflow = spec.callbacks.mlflow
    if mlflow is not None and mlflow.credentials_secret is not None:
        # MLflow's client reads these variables itself; a Secret holds a user and password or a token, not both
        env.extend({"name": key, "valueFrom": {"secretKeyRef": {
            "name": mlflow.credentials_secret.name, "key": key, "optional": True}}} for key in MLFLOW_CREDENTIAL_KEYS)
    return env


def _resources(spec: FinetuneRunSpec) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    if spec.resources.ephemeral_storage:
        amounts[EPHEMERAL_STORAGE] = spec.resources.ephemeral_storage
    limits = dict(amounts)
    if spec.resources.gpus > 0:
        limits[GPU_RESOURCE] = str(spec.resources.gpus)
    return {"requests": amounts, "limits": limits}


def rendezvous_address(run: dict[str, Any], attempt: int, mode: GangMode, cluster_ip: str | None) -> str | None:
    """``host:port`` of an attempt's rendezvous: rank 0's pod by its DNS name under the headless Service
    (``indexed``), or the Service's cluster IP (``per-node``: no cluster DNS needed; None until it is known)."""
    name = run["metadata"]["name"]
    if mode == "indexed":
        return f"{job_name(name, attempt)}-0.{rendezvous_service_name(name, attempt)}:{RENDEZVOUS_PORT}"
    if mode == "per-node" and cluster_ip:
        return f"{cluster_ip}:{RENDEZVOUS_PORT}"
    return None


def rendezvous_service(run: dict[str, Any], attempt: int, mode: GangMode,
                       owner_job: Mapping[str, Any]) -> dict[str, Any]:
    """The Service of an attempt's rendezvous, owned by its rank-0 Job (it goes when that Job goes).

    ``indexed``: headless, over all the Job's pods; each pod's hostname ``<job>-<index>`` under its subdomain
    is a DNS name. ``per-node``: a cluster IP in front of rank 0's pod, so that the other ranks' Jobs can be
    given the address when they are created, on clusters without DNS too."""
    meta = run["metadata"]
    selector = {RUN_LABEL: run_label(meta["name"]), ATTEMPT_LABEL: str(attempt)}
    spec: dict[str, Any] = {"selector": selector, "ports": [
        {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}]}
    if mode == "indexed":
        spec.update(clusterIP="None", publishNotReadyAddresses=True)
    else:
        selector[NODE_RANK_LABEL] = "0"
    owner = owner_job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": rendezvous_service_name(meta["name"], attempt),
            "namespace": meta["namespace"],
            "labels": labels(run, attempt),
            "annotations": run_annotations(run),
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": owner["name"],
                                 "uid": owner["uid"]}],
        },
        "spec": spec,
    }


def job(run: dict[str, Any], spec: FinetuneRunSpec, settings: OperatorSettings, *, attempt: int,
        resume_from: str | None = None, active_deadline_seconds: int | None = None,
        capabilities: Capabilities | None = None, node_rank: int = 0,
        rendezvous: str | None = None) -> dict[str, Any]:
    """The batch/v1 Job of one attempt, or, for a run over several pods (:func:`gang_mode`), the attempt's one
    Indexed Job, or node rank ``node_rank``'s Job (with the ``rendezvous`` address, see
    :func:`rendezvous_address`). Rank 0's Job is always named :func:`kubetune.api.names.job_name`.

    ``active_deadline_seconds`` is what is left of the run's ``activeDeadlineSeconds`` (the operator computes
    it from the run's start time so that retries do not extend the deadline).
    """
    meta = run["metadata"]
    resolved = resolve_spec(spec, settings)
    res = resolved.resources
    mode = gang_mode(spec, capabilities)
    job_labels = labels(run, attempt)
    if resolved.queue_name:
        job_labels[QUEUE_LABEL] = resolved.queue_name
    pod_labels = labels(run, attempt)
    if mode == "per-node":
        job_labels[NODE_RANK_LABEL] = pod_labels[NODE_RANK_LABEL] = str(node_rank)
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
            "env": _env(run, resolved, attempt, resume_from, settings.model_mirror, mode=mode, node_rank=node_rank,
                        rendezvous=rendezvous if mode == "per-node" else rendezvous_address(run, attempt, mode, None)),
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
            {"name": "config", "downwardAPI": {"defaultMode": 0o444, "items": [{
                "path": CONFIG_KEY, "fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"}}]}},
            {"name": "tmp", "emptyDir": {"sizeLimit": res.ephemeral_storage}},
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
    if mode != "single":
        pod_spec["containers"][0]["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT,
                                               "protocol": "TCP"}]
    if mode == "indexed":
        pod_spec["subdomain"] = rendezvous_service_name(meta["name"], attempt)
    pods = res.nodes if mode == "indexed" else 1
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "completions": pods,
        "parallelism": pods,
        "template": {"metadata": {"labels": pod_labels, "annotations": pod_annotations(run, spec, settings)},
                     "spec": pod_spec},
    }
    if mode == "indexed":
        job_spec["completionMode"] = "Indexed"
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = max(1, int(active_deadline_seconds))
    # A pod of a run over several pods that the Job controller replaced could not join its peers' rendezvous:
    # the operator fails and retries the whole unit instead (see kubetune.lifecycle.gang).
    if mode == "single" and capabilities is not None and capabilities.pod_failure_policy:
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
            "name": worker_job_name(meta["name"], attempt, node_rank),
            "namespace": meta["namespace"],
            "labels": job_labels,
            "annotations": run_annotations(run),
            "ownerReferences": [owner_reference(run)],
        },
        "spec": job_spec,
    }
