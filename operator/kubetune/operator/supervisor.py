"""The per-run supervisor: what the kopf daemon of an active FinetuneRun does.

One asyncio task per active run (kopf spawns it while the run is neither finished nor suspended, and stops it
when that changes, when the run is deleted, or when the operator exits):

1. make sure the current attempt's ConfigMap and Job exist (deterministic names; the intent — attempt number
   and Job name — is written to status *before* the Job is created, so a restarted operator finishes that
   same attempt instead of starting another: no duplicate Jobs, ever);
2. wait for the attempt's pod (from the Job/pod watch index, no polling);
3. follow the trainer container's log (``follow=true&timestamps=true``; reconnects resume after the last
   line seen), fold each line into the status with :class:`kubetune.status.StatusFolder`, and patch the
   status at most every ``status_interval`` seconds (coalesced; phase changes go out at once), within a
   global token bucket (``status_qps``) that keeps the API server safe with hundreds of runs;
4. when the pod ends, decide with :func:`kubetune.status.attempt_outcome`: succeed, retry from the latest
   checkpoint (a new attempt Job), or fail fast.

A finished run's daemon is never started again, so children of a finished run are never re-created. A run
annotated ``kubetune.io/cancel-requested`` stops at once: no new attempt, no retry, no more status writes (the
``cancel`` handler deletes the Jobs and writes ``Cancelled``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf
from pydantic import ValidationError

from kubetune import manifests
from kubetune.events import Event
from kubetune.operator.context import Context
from kubetune.operator.kube import (
    KubeError,
    config_maps_path,
    jobs_path,
    pods_path,
    runs_path,
    split_log_line,
)
from kubetune.spec import FinetuneRunSpec, Phase
from kubetune.status import (
    CREATED,
    POD_DELETED,
    RESTARTING,
    SUSPENDED,
    JobState,
    LogCursor,
    Outcome,
    PodState,
    StatusFolder,
    Throttle,
    attempt_outcome,
    cancel_request,
    get_condition,
    job_state,
    now_rfc3339,
    parse_rfc3339,
    pod_state,
    set_condition,
    transition,
)

RESYNC_SECONDS = 120.0  # a waiting supervisor re-reads its Job and pods this often (see maybe_resync)
URGENT_EVENTS = frozenset({"started", "finished", "failed", "artifact"})
WAITING_PROBLEMS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                              "CreateContainerError", "CrashLoopBackOff"})


def validate(spec: Mapping[str, Any]) -> tuple[FinetuneRunSpec | None, list[tuple[str, str]]]:
    """(model, []) for a valid spec, (None, [(field path, reason), ...]) otherwise. Pure.

    Field errors carry their camelCase path (``spec.training.epochs``); cross-field errors come from
    :func:`kubetune.spec.cross_field_errors` through the model validator, with their own paths."""
    try:
        return FinetuneRunSpec.model_validate(dict(spec)), []
    except ValidationError as e:
        errors: list[tuple[str, str]] = []
        for err in e.errors():
            loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.get("loc", ())).lstrip(".")
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            if not loc:  # the model-level (cross-field) validator: "path: reason; path: reason"
                for part in msg.split("; "):
                    path, sep, reason = part.partition(": ")
                    errors.append((path, reason) if sep and path.startswith("spec.") else ("spec", part))
            else:
                errors.append((f"spec.{loc}", msg))
        return None, errors


def format_errors(errors: list[tuple[str, str]]) -> str:
    return "; ".join(f"{path}: {reason}" for path, reason in errors)


class Supervisor:
    def __init__(self, ctx: Context, body: kopf.Body, stopped: Any, logger: logging.Logger | Any) -> None:
        self.ctx = ctx
        self.body = body  # kopf's live view: spec/status follow the watch
        self.stopped = stopped
        self.logger = logger
        meta = body.get("metadata") or {}
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.key = (self.namespace, manifests.run_label(self.name))
        self.folder = StatusFolder(body.get("status") or {})
        self.phase: str | None = self.folder.status.get("phase")
        self.throttle = Throttle(ctx.settings.status_interval)
        self.flush_lock = asyncio.Lock()
        self.changed = ctx.children.register(self.key)
        self.gone = False
        self.retry_pending = False
        self.cursor = LogCursor()  # how far the current attempt's log was read
        self.waiting_reported: str | None = None
        self.stream_opened = False
        self.stream_complete = False  # the last log stream ended on the server's side (not cut, not stopped)
        self.next_resync = time.monotonic() + RESYNC_SECONDS * random.uniform(1.0, 1.25)
        self.pod_attempt: int | None = None  # the attempt whose pod status.podName names (this process's view)

    # ------------------------------------------------------------------------------------ helpers
    @property
    def status(self) -> dict[str, Any]:
        return self.folder.status

    def cancelled(self) -> bool:
        """A cancel was requested: the ``cancel`` handler owns the run's Jobs and status from now on."""
        return cancel_request(self.body.get("metadata")) is not None

    def should_stop(self) -> bool:
        live_spec = self.body.get("spec") or {}
        suspended = bool((live_spec.get("runPolicy") or {}).get("suspend"))
        return self.gone or bool(self.stopped) or suspended or self.cancelled()

    def run_object(self) -> dict[str, Any]:
        return {"apiVersion": self.body.get("apiVersion"), "kind": self.body.get("kind"),
                "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid,
                             "generation": (self.body.get("metadata") or {}).get("generation", 1)},
                "spec": dict(self.body.get("spec") or {})}

    def set_phase(self, phase: str, reason: str, message: str, *, event: str | None = "Normal") -> None:
        self.folder.update(transition(self.status, phase, reason, message, time.time()))
        if event:
            kopf.event(self.body, type=event, reason=reason, message=message[:1024])

    async def flush(self, *, urgent: bool = False) -> None:
        """Send the coalesced status patch (if any)."""
        async with self.flush_lock:
            if not self.folder.has_pending or self.gone or self.cancelled():
                return  # a cancelled run's status is the cancel handler's (no stale phase over Cancelled)
            patch, written = self.folder.take_patch()
            if not urgent:
                await self.ctx.patch_limiter().acquire()
            try:
                await self.ctx.kube.merge_patch(runs_path(self.namespace, self.name, "status"), {"status": patch})
            except KubeError as e:
                if e.status == 404 and not e.transient:  # the run itself is gone (not: CRDs not loaded yet)
                    self.gone = True
                    return
                if e.status == 422:  # a bug: drop the patch rather than retrying it forever
                    self.logger.error(f"Status patch rejected: {e.message}")
                    return
                self.folder.requeue(patch, written)  # keep it pending; the next flush retries
                raise
            except (aiohttp.ClientError, asyncio.TimeoutError):
                # The API server stayed unreachable past the client's retries: keep the patch (a phase change
                # must not be lost) for the next flush, which the daemon kopf restarts makes.
                self.folder.requeue(patch, written)
                raise
            now = time.time()
            self.throttle.flushed(now)
            self.ctx.metrics.status_patches.inc()
            self.ctx.metrics.observe_lag(written, now)
            new_phase = patch.get("phase")
            if new_phase and new_phase != self.phase:
                self.ctx.metrics.transition(self.phase, new_phase)
                self.phase = new_phase
            self.ctx.metrics.table.update(self.namespace, self.name, self.status)

    async def maybe_flush(self, *, urgent: bool = False) -> None:
        if self.folder.has_pending and self.throttle.due(time.time(), urgent=urgent):
            await self.flush(urgent=urgent)

    async def wait_change(self, timeout: float) -> None:
        """Wait for a Job/pod change of this run (or the timeout), flushing pending status meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout=timeout)

    # ------------------------------------------------------------------------------------ main loop
    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.ctx.children.unregister(self.key)
            with contextlib.suppress(Exception):
                if not self.gone:
                    await self.flush(urgent=True)

    async def _run(self) -> None:
        spec, errors = validate(self.body.get("spec") or {})
        if spec is None:
            # The create/resume handler marks the run Failed (InvalidSpec); nothing to run.
            self.logger.info(f"Not starting: invalid spec: {format_errors(errors)}")
            return
        while not self.should_stop():
            job = await self.ensure_attempt(spec)
            if job is None:
                return
            outcome = await self.follow_attempt(job)
            if outcome is None or self.cancelled():
                return  # cancelled: the trainer's exit (143 on SIGTERM) is no failure to retry
            await self.finish_attempt(outcome)
            if outcome.action != "retry":
                return
            backoff = min(60.0, 2.0 ** int(self.status.get("retries") or 1))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), timeout=backoff)

    # ------------------------------------------------------------------------------------ attempts
    def _deadline_left(self, spec: FinetuneRunSpec, now: float) -> float | None:
        limit = spec.run_policy.active_deadline_seconds
        if limit is None:
            return None
        started = parse_rfc3339(self.status.get("startTime")) or now
        return limit - (now - started)

    async def ensure_attempt(self, spec: FinetuneRunSpec) -> str | None:
        """Name of the current attempt's Job, creating it when needed; None when the run ended here."""
        attempt = int(self.status.get("attempts") or 0)
        job_name = self.status.get("jobName")
        created = get_condition(self.status.get("conditions"), CREATED)
        resuming = self.status.get("phase") == Phase.SUSPENDED.value or (
            (get_condition(self.status.get("conditions"), SUSPENDED) or {}).get("status") == "True")
        # Restarting=True is persisted between a retryable failure and the next attempt's Job creation: a
        # restart in that window goes on with the retry instead of re-judging (and re-counting) the failure.
        restarting = (get_condition(self.status.get("conditions"), RESTARTING) or {}).get("status") == "True"
        if restarting and attempt > 0:
            self.retry_pending = True
        need_new = attempt == 0 or not job_name or self.retry_pending or resuming
        if not need_new and job_name == manifests.job_name(self.name, attempt):
            if created is not None and created.get("status") == "True":
                if self.ctx.children.job(self.namespace, job_name) is not None:
                    return job_name
                if await self.ctx.kube.get(jobs_path(self.namespace, job_name)) is not None:
                    return job_name
                self.set_phase(Phase.CANCELLED.value, "JobDeleted",
                               f"Job {job_name} was deleted; the run is cancelled (it is never re-created).",
                               event="Warning")
                await self.flush(urgent=True)
                return None
            # The intent was recorded but the creation not confirmed (restart in between): create it now.
            return await self.create_attempt(spec, attempt, reason="resume")
        now = time.time()
        left = self._deadline_left(spec, now)
        if left is not None and left <= 0:
            self.set_phase(Phase.FAILED.value, "DeadlineExceeded",
                           "The run exceeded spec.runPolicy.activeDeadlineSeconds.", event="Warning")
            await self.flush(urgent=True)
            return None
        reason = "initial" if attempt == 0 else ("retry" if self.retry_pending else "resume")
        attempt += 1
        job_name = manifests.job_name(self.name, attempt)
        intent: dict[str, Any] = {
            "attempts": attempt,
            "jobName": job_name,
            "podName": None,
            "observedGeneration": (self.body.get("metadata") or {}).get("generation"),
            "conditions": set_condition(self.status.get("conditions") or [], CREATED, "False", "Creating",
                                        f"Creating Job {job_name}.", now),
        }
        if resuming:
            intent["conditions"] = set_condition(intent["conditions"], SUSPENDED, "False", "Resumed",
                                                 "Resumed; continuing from the latest checkpoint.", now)
        self.folder.update(intent)
        if self.status.get("phase") != Phase.PENDING.value:
            message = ("Retrying from the latest checkpoint." if reason == "retry" else
                       "Resuming from the latest checkpoint." if reason == "resume" else "Creating the trainer Job.")
            self.set_phase(Phase.PENDING.value, {"initial": "Accepted", "retry": "Restarting",
                                                 "resume": "Resumed"}[reason], message, event=None)
        # No status write before the Job: its name is deterministic and the decision to create attempt N
        # is made from persisted state only, so a restart in between re-decides the same N and adopts the Job
        # (409). The intent goes out with the JobCreated patch below (one round trip less to a running Job).
        self.retry_pending = False
        return await self.create_attempt(spec, attempt, reason=reason)

    async def create_attempt(self, spec: FinetuneRunSpec, attempt: int, *, reason: str) -> str | None:
        ctx = self.ctx
        run = self.run_object()
        capabilities = await ctx.server_capabilities()
        cm = manifests.config_map(run, spec, ctx.settings)
        left = self._deadline_left(spec, time.time())
        job = manifests.job(run, spec, ctx.settings, attempt=attempt, resume_from=self.status.get("checkpoint"),
                            active_deadline_seconds=int(left) if left is not None else None,
                            capabilities=capabilities)
        # Concurrently: the pod waits for its ConfigMap volume if the Job happens to be first.
        with ctx.metrics.timed("create_attempt"):
            _, created = await asyncio.gather(self._create_owned(config_maps_path(self.namespace), cm),
                                              self._create_owned(jobs_path(self.namespace), job))
        job_name = job["metadata"]["name"]
        if self.should_stop():  # suspended or deleted while creating: do not leave a Job running
            if created and not self.gone:
                await ctx.kube.delete(jobs_path(self.namespace, job_name))
            return None
        now = time.time()
        conditions = set_condition(self.status.get("conditions") or [], CREATED, "True", "JobCreated",
                                   f"Job {job_name} created (attempt {attempt}).", now)
        if (get_condition(conditions, RESTARTING) or {}).get("status") == "True":
            conditions = set_condition(conditions, RESTARTING, "False", "JobCreated",
                                       f"Attempt {attempt} started as Job {job_name}.", now)
        update: dict[str, Any] = {"conditions": conditions}
        if not self.status.get("startTime"):
            update["startTime"] = now_rfc3339(now)
        self.folder.update(update)
        await self.flush(urgent=True)
        if created:
            ctx.metrics.jobs_created.labels(reason=reason).inc()
            kopf.event(self.body, type="Normal", reason="JobCreated",
                       message=f"Created Job {job_name} (attempt {attempt}).")
        if spec.queue_name and not capabilities.job_suspend:
            kopf.event(self.body, type="Warning", reason="QueueUnsupported",
                       message="spec.queueName is set but this API server has no Job suspend (1.21+), which "
                               "Kueue needs; the Job runs without queueing.")
        self.cursor = LogCursor()
        self.folder.started = self.folder.finished = False
        self.folder.last_failed = None
        return job_name

    async def _create_owned(self, collection: str, obj: dict[str, Any]) -> bool:
        existing, created = await self.ctx.kube.create(collection, obj)
        if not created:
            owners = {ref.get("uid") for ref in (existing.get("metadata") or {}).get("ownerReferences") or ()}
            if self.uid not in owners:
                raise kopf.TemporaryError(
                    f"{obj['kind']} {obj['metadata']['name']} exists and belongs to someone else "
                    "(an earlier run of the same name being deleted?)", delay=5)
        return created

    # ------------------------------------------------------------------------------------ following
    async def follow_attempt(self, job_name: str) -> Outcome | None:
        attempt = int(self.status.get("attempts") or 1)
        while not self.should_stop():
            self.changed.clear()
            pod = self.ctx.children.pod(self.key, attempt)
            job = self.ctx.children.job(self.namespace, job_name)
            if pod is not None and pod.deleting and not (job is not None and (job.failed or job.complete)):
                # A deleted pod (kubectl delete, a drain) does not decide the attempt: Kubernetes 1.20's Job
                # controller either starts a replacement (followed below once it exists) or counts a failure
                # and fails the Job (then: retry from the latest checkpoint). Which one depends on timing.
                pod = None
            followable = pod is not None and (pod.started or (pod.scheduled and not pod.terminated
                                                              and pod.waiting_reason not in WAITING_PROBLEMS))
            if pod is not None and followable:
                # Follow as soon as the pod is on a node: the stream opens the moment the container starts
                # (the pod watch reports "running" only after the kubelet's next status sync).
                previous = self.status.get("podName")
                if previous != pod.name:
                    if previous and self.pod_attempt == attempt:  # the Job controller replaced a deleted pod
                        message = (f"Trainer pod {previous} of attempt {attempt} is gone; the Job started {pod.name}, "
                                   "which resumes from the latest checkpoint.")
                        kopf.event(self.body, type="Warning", reason="TrainerPodReplaced", message=message)
                        self.folder.update({"message": message})
                    self.pod_attempt = attempt
                    self.folder.update({"podName": pod.name})
                opened = await self.follow_log(pod.name)
                if self.should_stop():
                    return None
                if not opened and not pod.started:
                    await self.wait_change(0.5)  # the container is not running yet
                    continue
                fresh = await self.ctx.kube.get(pods_path(self.namespace, pod.name))
                state = pod_state(fresh) if fresh is not None else None
                if state is not None and state.deleting:
                    job_now = await self._job_state(job_name)
                    if job_now is not None and job_now.failed:
                        return self._outcome(state, job_now)
                    await self.wait_change(1.0)  # the replacement pod, or the Job's failure, shows up next
                    continue
                if state is not None and state.terminated:
                    await self._drain_log(pod.name)
                    return self._outcome(state, await self._job_state(job_name))
                if state is None:
                    job_now = await self._job_state(job_name)
                    if job_now is not None and (job_now.failed or job_now.complete):
                        return self._outcome(None, job_now)
                    if job_now is None:
                        continue  # ensure_attempt's caller sees the Job gone on the next round
                await self.wait_change(1.0)  # stream dropped while running: reconnect
                continue
            if pod is not None and pod.terminated:  # failed before the container started (e.g. evicted)
                return self._outcome(pod, await self._job_state(job_name))
            if job is not None and (job.failed or job.complete):
                return self._outcome(None, job)
            if pod is not None:
                await self._report_waiting(pod)
            await self.maybe_flush()
            await self.wait_change(5.0)
            await self.maybe_resync(job_name)
            if (job is None and self.ctx.children.job(self.namespace, job_name) is None
                    and await self.ctx.kube.get(jobs_path(self.namespace, job_name)) is None):
                if self.should_stop():
                    return None
                self.set_phase(Phase.CANCELLED.value, "JobDeleted",
                               f"Job {job_name} was deleted; the run is cancelled.", event="Warning")
                await self.flush(urgent=True)
                return None
        return None

    async def maybe_resync(self, job_name: str) -> None:
        """Safety net for a missed watch event: while waiting for the attempt's pod, re-read its Job and pods
        from the API server every ``RESYNC_SECONDS`` (jittered) into the index, so that a stale index (a watch
        that lost an event across an API server restart) cannot keep a run waiting for ever."""
        now = time.monotonic()
        if now < self.next_resync:
            return
        self.next_resync = now + RESYNC_SECONDS * random.uniform(1.0, 1.25)
        job = await self.ctx.kube.get(jobs_path(self.namespace, job_name))
        pods = await self.ctx.kube.list(pods_path(self.namespace), f"{manifests.RUN_LABEL}={self.key[1]}")
        self.ctx.children.resync(self.key, job_name, job, pods)

    async def _drain_log(self, pod_name: str) -> None:
        """Before judging a terminated trainer: when its last event (``finished``/``failed``) was not read, the
        stream may have been cut (an API server restart) while the trainer wrote its last lines (progress,
        metrics, the artifact). Read the rest of the finished container's log (from the last timestamp seen, no
        line counted twice); at most 3 tries when the stream keeps being cut. One extra request for a trainer
        that died without a last event (OOM, SIGKILL)."""
        for _ in range(3):
            if self.folder.finished or self.folder.last_failed is not None or self.should_stop():
                return
            await self.follow_log(pod_name)
            if self.stream_complete:
                return

    async def _job_state(self, job_name: str) -> JobState | None:
        raw = await self.ctx.kube.get(jobs_path(self.namespace, job_name))
        return job_state(raw) if raw is not None else None

    async def _report_waiting(self, pod: PodState) -> None:
        reason = pod.waiting_reason
        if reason in WAITING_PROBLEMS and reason != self.waiting_reported:
            self.waiting_reported = reason
            message = f"Trainer pod {pod.name}: {reason}: {pod.message or ''}".strip()
            self.folder.update({"message": message[:1024]})
            kopf.event(self.body, type="Warning", reason=reason, message=message[:1024])

    def _outcome(self, pod: PodState | None, job: JobState | None) -> Outcome:
        spec = FinetuneRunSpec.model_validate(self.body.get("spec") or {})
        pod_reason = pod.reason if pod else None
        if (pod is None or pod.deleting) and (pod is None or pod.exit_code is None) and job is not None:
            pod_reason = POD_DELETED  # the Job ended with its pod gone before it told an exit code: lost
        return attempt_outcome(exit_code=pod.exit_code if pod else None, pod_reason=pod_reason,
                               job=job, failed_event=self.folder.last_failed,
                               retries=int(self.status.get("retries") or 0),
                               backoff_limit=spec.run_policy.backoff_limit)

    async def follow_log(self, pod_name: str) -> bool:
        """Follow the trainer's log until the stream ends or the run must stop. False when the stream could
        not be opened (the container has not started yet)."""
        params: dict[str, Any] = {"container": manifests.CONTAINER_NAME, "follow": "true", "timestamps": "true"}
        since = self.cursor.since_time()
        if since is not None:
            params["sinceTime"] = now_rfc3339(since)
        self.cursor.reopened()
        self.stream_opened = self.stream_complete = False
        metrics = self.ctx.metrics
        metrics.log_streams.inc()
        reader = asyncio.ensure_future(self._read(pod_name, params))
        stopper = asyncio.ensure_future(self.stopped.wait())
        try:
            while not reader.done():
                await asyncio.wait({reader, stopper}, timeout=self.throttle.delay(time.time()) or
                                   self.ctx.settings.status_interval, return_when=asyncio.FIRST_COMPLETED)
                if self.should_stop():
                    break
                await self.maybe_flush()
        finally:
            metrics.log_streams.dec()
            stopper.cancel()
            if not reader.done():
                reader.cancel()
            # aiohttp.ClientError: the stream cut mid-response (ClientPayloadError, ServerDisconnectedError) when
            # the API server restarts; the loop in follow_attempt reopens it (sinceTime: no line counted twice).
            with contextlib.suppress(asyncio.CancelledError, KubeError, OSError, asyncio.TimeoutError,
                                     aiohttp.ClientError):
                await reader
            # Complete: the server ended the stream (the container's log is all read), not an error or a stop.
            self.stream_complete = (self.stream_opened and reader.done() and not reader.cancelled()
                                    and reader.exception() is None)
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                error = reader.exception()
                if not (isinstance(error, KubeError) and error.status == 400 and not self.stream_opened):
                    self.logger.warning(f"Log stream of {pod_name} ended: {error!r}")
        # The stream ended: the container exited (or the connection dropped). What it wrote last goes out now,
        # not after the throttle: the pod's end is seen seconds later, and reconnects may follow.
        await self.flush(urgent=True)
        return self.stream_opened

    async def _on_stream_open(self, pod_name: str) -> None:
        self.stream_opened = True
        if self.cursor.last_ts is None:
            self.folder.tail.clear()  # the whole log replays: rebuild the tail from it, without duplicates
        if self.phase != Phase.RUNNING.value and self.status.get("phase") != Phase.RUNNING.value:
            self.set_phase(Phase.RUNNING.value, "PodRunning", f"Trainer pod {pod_name} is running.")
            await self.flush(urgent=True)

    async def _read(self, pod_name: str, params: dict[str, Any]) -> None:
        async def opened() -> None:
            await self._on_stream_open(pod_name)

        async for raw in self.ctx.kube.stream_lines(pods_path(self.namespace, pod_name, "log"), params,
                                                    on_open=opened):
            stamp, text = split_log_line(raw)
            t = parse_rfc3339(stamp) if stamp else None
            if not self.cursor.accept(t):
                continue  # replayed after a reconnect: already folded
            if t is not None:
                self.ctx.metrics.log_delivery.observe(max(0.0, time.time() - t))
            event = self.folder.feed_line(text, t if t is not None else time.time())
            if event is not None:
                await self._on_event(event)

    async def _on_event(self, event: Event) -> None:
        self.ctx.metrics.trainer_events.labels(type=event.type).inc()
        urgent = event.type in URGENT_EVENTS
        if event.type == "started" and self.status.get("phase") != Phase.RUNNING.value:
            self.set_phase(Phase.RUNNING.value, "TrainerStarted", "The trainer started.")
        if event.type == "failed":
            self.folder.update({"message": (f"{event.reason or 'Failed'}: {event.message or ''}")[:1024]})
        await self.maybe_flush(urgent=urgent)

    # ------------------------------------------------------------------------------------ outcome
    async def _stop_previous_attempt(self) -> None:
        """Before a retry: a Job that is still active (its controller replaced a lost pod meanwhile) is
        deleted, so two trainers of one run never write the same checkpoints. A finished Job stays (history)."""
        job_name = self.status.get("jobName")
        if not job_name:
            return
        job = await self._job_state(job_name)
        if job is not None and not (job.failed or job.complete):
            self.logger.info(f"Deleting the still-active Job {job_name} before the retry.")
            await self.ctx.kube.delete(jobs_path(self.namespace, job_name))

    async def finish_attempt(self, outcome: Outcome) -> None:
        if outcome.action == "succeed":
            artifact = (self.status.get("artifact") or {}).get("uri")
            message = outcome.message + (f" Artifact: {artifact}" if artifact else "")
            self.set_phase(Phase.SUCCEEDED.value, outcome.reason, message)
        elif outcome.action == "retry":
            now = time.time()
            self.folder.update({
                "retries": int(self.status.get("retries") or 0) + 1,
                "conditions": set_condition(self.status.get("conditions") or [], RESTARTING, "True",
                                            outcome.reason, outcome.message, now),
            })
            self.set_phase(Phase.PENDING.value, outcome.reason, outcome.message, event="Warning")
            self.retry_pending = True
            await self._stop_previous_attempt()
        else:
            self.set_phase(Phase.FAILED.value, outcome.reason, outcome.message, event="Warning")
        await self.flush(urgent=True)
