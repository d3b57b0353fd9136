"""kopf handlers: thin, each delegating to pure functions or the :class:`Supervisor`.

:func:`build_registry` registers everything on a fresh :class:`kopf.OperatorRegistry` (no import-time side
effects; the TTL timer interval comes from the settings object).

- ``on.startup``: kopf settings (own finalizer/annotation prefixes, event reporting, watch timeouts,
  server-side label selectors);
- ``on.login``: kopf's login (service account or kubeconfig); in a pod, the API server is addressed by
  ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT`` (set in every pod) rather than kopf's
  ``https://kubernetes.default.svc``, which needs cluster DNS; the same credentials build the async client;
- ``on.create`` / ``on.resume``: cross-field validation → ``Failed``/``InvalidSpec`` condition and a Warning
  Event with the field paths, and no Job; a valid run the platform refuses (its allow-list, or a run config too
  large for the pod template: :func:`~kubetune.operator.supervisor.admission_refusal`) → ``Failed``,
  ``Admitted=False`` (``PolicyViolation``/``ConfigTooLarge``) and a Warning Event, and no Job; ``Suspended`` when
  created suspended;
- ``daemon``: the :class:`Supervisor` of an active run (neither finished nor suspended);
- ``cancel`` (``on.field`` of the annotation ``kubetune.io/cancel-requested``, and ``on.resume``, while the
  run carries it and has not ended): delete the Jobs (checkpoints stay in S3) → ``Cancelled`` (terminal:
  never re-launched, not on resume nor on unsuspend), a ``Cancelled`` condition and Event;
- ``on.field(spec.runPolicy.suspend)``: suspend deletes the attempt's Job (checkpoints stay in S3); unsuspend
  lets the daemon resume with a new attempt;
- ``on.update(spec)``: re-validate; the ``SpecValid`` condition and an Event say whether (and from when) the
  edit applies: the running attempt keeps its spec (in its Job's immutable pod template), the next attempt's Job
  is built from the latest valid one (:mod:`kubetune.lifecycle.attempts`); an edit the platform refuses is not
  applied (``Admitted=False``, a Warning Event);
- ``on.delete``: kopf stops the daemon (and so the log following) first; Jobs are deleted at once;
- ``timer``: TTL after finish: delete the Jobs (with them their run configs), keep the run and its artifact
  (once: the timer stops when the run is ``CleanedUp``). The operator holds no ConfigMap rights: ConfigMaps an
  older version wrote go with their run (owner references, the garbage collector);
- ``on.event`` for runs/Jobs/pods: the metrics table; the Job/pod index the supervisors wait on;

Every handler's errors are counted in ``kubetune_reconcile_errors_total{handler}`` (see :mod:`.metrics`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import kopf

from kubetune.api.spec import CANCEL_ANNOTATION, GROUP, PLURAL, VERSION, FinetuneRunStatus, Phase
from kubetune.api.validation import format_errors, validate_spec
from kubetune.lifecycle.attempts import spec_edit_update
from kubetune.lifecycle.conditions import is_terminal
from kubetune.lifecycle.policy import (
    accept_update,
    accepting,
    cancel_pending,
    cancel_update,
    is_active,
    is_suspended,
    readmitted,
    refused_edit_update,
    resume_update,
    suspend_toggle,
    suspend_update,
    ttl_after_finished,
    ttl_due,
    ttl_pending,
    ttl_update,
)
from kubetune.operator import manifests
from kubetune.operator.context import Context
from kubetune.operator.kube import Kube, jobs_path
from kubetune.operator.supervisor import Supervisor, admission_refusal

SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
PREFIX = "kubetune.io"
FINALIZER = f"{PREFIX}/finalizer"
RUNS = (GROUP, VERSION, PLURAL)
RUN_SELECTOR = manifests.RUN_LABEL  # "label exists" selector


class ProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's annotation progress storage under ``kubetune.io/``, except that the cancel annotation (same
    prefix) stays in the object's essence: kopf drops every ``kubetune.io/*`` annotation from the diff, so a
    cancel request would otherwise trigger no handler."""

    def clear(self, *, essence: Any) -> Any:
        annotations = (essence.get("metadata") or {}).get("annotations") or {}
        keep = {k: annotations[k] for k in (CANCEL_ANNOTATION,) if k in annotations}
        cleared = super().clear(essence=essence)
        if keep:
            cleared.setdefault("metadata", {}).setdefault("annotations", {}).update(keep)
        return cleared


def configure_kopf(settings: kopf.OperatorSettings, *, instance: str | None = None) -> None:
    """Apply kubetune's kopf settings (pure apart from mutating ``settings``)."""
    # kopf runs only in the replica holding the Lease (kubetune.operator.leader): its own peering stays off.
    settings.peering.standalone = True
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = ProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration")
    settings.posting.reporting_component = "kubetune-operator"
    settings.posting.reporting_instance = instance or socket.gethostname()
    settings.posting.event_name_prefix = "kubetune-"
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 60
    settings.watching.label_selectors["batch/v1", "jobs"] = RUN_SELECTOR
    settings.watching.label_selectors["v1", "pods"] = RUN_SELECTOR


WATCH_HANDLERS = ("run_event", "job_event", "pod_event")


class QuietWatchHandlers(logging.Filter):
    """Drops kopf's "Handler '...pod_event' succeeded." lines: one per watch event of every run, Job and pod
    (95% of the log, and its formatting cost, with hundreds of runs); their failures are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO or not isinstance(record.msg, str) or "succeeded" not in record.msg:
            return True
        return not any(f"'{name}' succeeded" in record.msg for name in WATCH_HANDLERS)


# kopf filters: kopf's keyword arguments in, the lifecycle rule (kubetune.lifecycle.policy) out.
def _active(spec: Any, status: Any, meta: Any = None, **_: Any) -> bool:
    return is_active(spec, status, meta)


def _cancel_pending(meta: Any, status: Any, **_: Any) -> bool:
    return cancel_pending(meta, status)


def _ttl_pending(spec: Any, status: Any, **_: Any) -> bool:
    return ttl_pending(spec, status)


def _ctx(memo: kopf.Memo) -> Context:
    ctx: Context = memo.ctx
    return ctx


def _selector(name: str) -> str:
    return f"{manifests.RUN_LABEL}={manifests.run_label(name)}"


def _run(body: kopf.Body) -> dict[str, Any]:
    """The run as the manifest builders take it."""
    meta = body.get("metadata") or {}
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "generation") if k in meta}}


# -------------------------------------------------------------------------------------------- activities
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure_kopf(settings)


def login(memo: kopf.Memo, **kwargs: Any) -> Any:
    """kopf's login; the same credentials build (or refresh) the operator's own API client."""
    ctx = _ctx(memo)
    info = connection_info(**kwargs)
    if info is not None:
        if ctx.kube_client is None:
            ctx.kube_client = Kube.from_connection_info(info, relogin=lambda: _relogin(ctx, kwargs))
            ctx.kube_client.on_response = ctx.metrics.api_request
        else:
            ctx.kube_client.update_credentials(info)
    return info


# -------------------------------------------------------------------------------------------- runs
async def accept(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, patch: kopf.Patch,
                 memo: kopf.Memo, **_: Any) -> None:
    """A new run (or one seen again after a restart): an invalid spec fails it at once, with the field paths, and
    so does one the platform does not admit; a run created suspended waits. Everything else is the
    supervisor's."""
    ctx = _ctx(memo)
    metrics = ctx.metrics
    with metrics.timed("accept"):
        if not accepting(status, meta):
            return  # already handled (resume after restart), or cancelled: `cancel` takes over
        model, errors = validate_spec(spec)
        invalid = format_errors(errors) if model is None else None
        refusal = admission_refusal(_run(body), model, ctx.settings) if model is not None else None
        accepted = accept_update(status, meta.get("generation"), invalid=invalid, suspended=is_suspended(spec),
                                 now=time.time(), refusal=refusal)
        if accepted is None:
            return
        change, update = accepted
        patch.status.update(update)
        if change.phase == Phase.FAILED.value:
            kopf.warn(body, reason=change.reason, message=change.message[:1024])
        metrics.transition(None, change.phase)


async def supervise(body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger, memo: kopf.Memo,
                    **_: Any) -> None:
    ctx = _ctx(memo)
    with ctx.metrics.counting_errors("supervisor"):
        await Supervisor(ctx, body, stopped, logger).run()


async def cancel(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, name: str | None,
                 namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    # kopf stops the daemon (its `when` no longer holds); the supervisor also sees the annotation and neither
    # retries nor writes status any more. Deleting the Jobs here cannot lead to a retry.
    ctx = _ctx(memo)
    with ctx.metrics.timed("cancel"):
        deleted = await ctx.kube.delete_collection(jobs_path(str(namespace)), _selector(str(name)))
        update = cancel_update(status, meta, deleted, time.time())
        patch.status.update(update)
        kopf.info(body, reason="Cancelled", message=update["message"])
        ctx.metrics.transition(status.get("phase"), Phase.CANCELLED.value)


async def suspend_changed(body: kopf.Body, old: Any, new: Any, status: kopf.Status, meta: kopf.Meta,
                          patch: kopf.Patch, name: str | None, namespace: str | None, memo: kopf.Memo,
                          **_: Any) -> None:
    toggle = suspend_toggle(old, new, status, meta)
    if toggle is None:
        return
    ctx = _ctx(memo)
    with ctx.metrics.timed("suspend"):
        now = time.time()
        if toggle == "suspend":
            deleted = await ctx.kube.delete_collection(jobs_path(str(namespace)), _selector(str(name)))
            update = suspend_update(status, deleted, now)
            patch.status.update(update)
            kopf.info(body, reason="Suspended", message=update["message"])
            ctx.metrics.transition(status.get("phase"), Phase.SUSPENDED.value)
        else:
            patch.status.update(resume_update(FinetuneRunStatus.model_validate(dict(status)), now))
            kopf.info(body, reason="Resumed", message="Resumed; a new attempt continues from the latest checkpoint.")


async def spec_updated(body: kopf.Body, diff: kopf.Diff, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta,
                       patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    if all(tuple(d[1]) == ("runPolicy", "suspend") or _only_suspend(d) for d in diff):
        return  # handled by suspend_changed
    ctx = _ctx(memo)
    with ctx.metrics.timed("update"):
        if is_terminal(status):
            kopf.info(body, reason="SpecChangeIgnored", message="The run has finished; spec changes have no effect.")
            return
        model, errors = validate_spec(spec)
        refusal = admission_refusal(_run(body), model, ctx.settings) if model is not None else None
        typed, generation, now = FinetuneRunStatus.model_validate(dict(status)), meta.get("generation"), time.time()
        if refusal is not None:
            update = refused_edit_update(typed, generation, refusal, now)
            patch.status.update(update)
            kopf.warn(body, reason=refusal.reason, message=update["message"][:1024])
            return
        update = spec_edit_update(typed, generation, format_errors(errors) if errors else None, now)
        if not errors:
            update["conditions"] = readmitted(update["conditions"], generation, now)
        patch.status.update(update)
        if errors:
            kopf.warn(body, reason="InvalidSpecUpdate", message=update["message"][:1024])
        else:
            kopf.info(body, reason="SpecUpdated", message=update["message"])


async def deleted(name: str | None, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    ctx = _ctx(memo)
    with ctx.metrics.timed("delete"):
        # The daemon is already stopped (kopf stops it before deletion handlers); owner references would
        # garbage-collect the Jobs too, but deleting them now frees the GPUs at once.
        await ctx.kube.delete_collection(jobs_path(str(namespace)), _selector(str(name)))
        ctx.metrics.table.forget(str(namespace), str(name))
        ctx.children.forget_run((str(namespace), manifests.run_label(str(name))))


async def ttl(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, patch: kopf.Patch, name: str | None,
              namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    if not ttl_due(status, ttl_after_finished(spec), time.time()):
        return
    ctx = _ctx(memo)
    with ctx.metrics.timed("ttl"):
        jobs = await ctx.kube.delete_collection(jobs_path(str(namespace)), _selector(str(name)))
        message, update = ttl_update(status, jobs, time.time())
        patch.status.update(update)
        kopf.info(body, reason="TTLExpired", message=message)


# The on.event handlers are async on purpose: kopf runs sync handlers in a thread pool, one thread hop (and GIL
# hand-over) per watch event, which is most of their cost with hundreds of runs.
async def run_event(event: kopf.RawEvent, name: str | None, namespace: str | None, spec: kopf.Spec,
                    status: kopf.Status, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    metrics = _ctx(memo).metrics
    with metrics.counting_errors("run_event"):
        if event.get("type") == "DELETED":
            metrics.table.forget(str(namespace), str(name))
        else:
            model = (spec.get("model") or {}).get("name")
            # The creation time dates a first Pending phase (kubetune_run_phase_start_time_seconds).
            metrics.table.update(str(namespace), str(name), status, model=str(model) if model else None,
                                 created=meta.get("creationTimestamp"))


# -------------------------------------------------------------------------------------------- children
async def job_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    ctx = _ctx(memo)
    with ctx.metrics.counting_errors("job_event"):
        ctx.children.on_job(event.get("type"), body)


async def pod_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    ctx = _ctx(memo)
    with ctx.metrics.counting_errors("pod_event"):
        ctx.children.on_pod(event.get("type"), body)


def build_registry(ctx: Context) -> kopf.OperatorRegistry:
    """Every handler on a fresh registry (nothing registers at import time). The handlers find ``ctx`` in
    kopf's memo (``kopf.operator(memo=kopf.Memo(ctx=ctx))``); only the TTL timer's interval is read here."""
    registry = kopf.OperatorRegistry()
    kopf.on.startup(registry=registry)(startup)
    kopf.on.login(registry=registry)(login)
    kopf.on.create(*RUNS, id="accept", registry=registry)(accept)
    kopf.on.resume(*RUNS, id="accept", registry=registry)(accept)
    kopf.daemon(*RUNS, id="supervisor", when=_active, cancellation_timeout=10.0, registry=registry)(supervise)
    # on.field, not on.update: kopf leaves annotations under its own prefix (kubetune.io) out of the diff base
    # unless a handler names the field. It fires on creation too; on.resume covers a restart (and a run
    # suspended-and-annotated by an older SDK). kopf calls one function once per cause.
    kopf.on.field(*RUNS, id="cancel", field=("metadata", "annotations", CANCEL_ANNOTATION), when=_cancel_pending,
                  registry=registry)(cancel)
    kopf.on.resume(*RUNS, id="cancel", when=_cancel_pending, registry=registry)(cancel)
    kopf.on.field(*RUNS, id="suspend", field="spec.runPolicy.suspend", registry=registry)(suspend_changed)
    kopf.on.update(*RUNS, id="spec", field="spec", registry=registry)(spec_updated)
    kopf.on.delete(*RUNS, id="delete", registry=registry)(deleted)
    kopf.timer(*RUNS, id="ttl", interval=ctx.settings.ttl_check_interval, when=_ttl_pending, initial_delay=1.0,
               registry=registry)(ttl)
    kopf.on.event(*RUNS, id="run_event", registry=registry)(run_event)
    kopf.on.event("batch", "v1", "jobs", id="job_event", labels={manifests.RUN_LABEL: kopf.PRESENT},
                  registry=registry)(job_event)
    kopf.on.event("", "v1", "pods", id="pod_event", labels={manifests.RUN_LABEL: kopf.PRESENT},
                  registry=registry)(pod_event)
    return registry


def _only_suspend(diff_item: Any) -> bool:
    """A diff item on ``runPolicy`` as a whole whose only change is ``suspend``."""
    _, path, old, new = diff_item
    if tuple(path) != ("runPolicy",) or not isinstance(old, dict) or not isinstance(new, dict):
        return False
    keys = set(old) | set(new)
    return all(old.get(k) == new.get(k) for k in keys if k != "suspend")


def in_cluster_server(env: Mapping[str, str]) -> str | None:
    """The API server's URL from the ``KUBERNETES_SERVICE_HOST``/``_PORT`` variables the kubelet sets in every
    pod (as client-go's in-cluster config does); None outside a pod. IPv6 hosts get brackets."""
    host = (env.get("KUBERNETES_SERVICE_HOST") or "").strip()
    if not host:
        return None
    port = (env.get("KUBERNETES_SERVICE_PORT") or "").strip() or "443"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"https://{host}:{port}"


def connection_info(*, env: Mapping[str, str] | None = None, token_path: str = SERVICE_ACCOUNT_TOKEN,
                    **kwargs: Any) -> Any:
    """kopf's own login functions, in the order kopf uses: in-cluster service account, then kubeconfig.

    kopf's service-account login addresses ``https://kubernetes.default.svc``, which needs cluster DNS; in a
    pod the server comes from ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT`` instead (the API server's
    certificate carries the ``kubernetes`` Service IP, which is what these variables hold)."""
    if os.path.exists(token_path):
        info = kopf.login_with_service_account(**kwargs)
        if info is not None:
            server = in_cluster_server(os.environ if env is None else env)
            return dataclasses.replace(info, server=server) if server else info
    return kopf.login_with_kubeconfig(**kwargs)


def _relogin(ctx: Context, kwargs: dict[str, Any]) -> None:
    info = connection_info(**kwargs)
    if info is not None and ctx.kube_client is not None:
        ctx.kube_client.update_credentials(info)
