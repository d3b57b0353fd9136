"""The per-run supervisor: what the kopf daemon of an active FinetuneRun does.

One asyncio task per active run (kopf spawns it while the run is neither finished nor suspended, and stops it
when that changes, when the run is deleted, or when the operator exits):

1. make sure the current attempt's Job exists, its run config in its pod template (deterministic names; the
   intent — attempt number and Job name — is written to status *before* the Job is created, so a restarted
   operator finishes that same attempt instead of starting another: no duplicate Jobs, ever); a spec the
   platform does not admit (:func:`admission_refusal`) gets no Job;
2. wait for the attempt's pod (from the Job/pod watch index, no polling);
3. follow the trainer container's log (``follow=true&timestamps=true``; reconnects resume after the last
   line seen), fold each line into the status with :class:`kubetune.lifecycle.fold.StatusFolder`, and patch the
   status at most every ``status_interval`` seconds (coalesced; phase changes go out at once), within a
   global token bucket (``status_qps``) that keeps the API server safe with hundreds of runs;
4. when the pod ends, judge it with :func:`kubetune.lifecycle.outcome.outcome_of`: succeed, retry from the
   latest checkpoint (a new attempt Job), or fail fast.

What an observation means, and what to do about it, is decided by the pure rules of :mod:`kubetune.lifecycle`
(:func:`~kubetune.lifecycle.attempts.decide_attempt`, :func:`~kubetune.lifecycle.follow.next_step`,
:func:`~kubetune.lifecycle.outcome.finish_update`, ...); this module observes, and carries out their steps.

A finished run's daemon is never started again, so children of a finished run are never re-created. A run
annotated ``kubetune.io/cancel-requested`` stops at once: no new attempt, no retry, no more status writes (the
``cancel`` handler deletes the Jobs and writes ``Cancelled``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import kopf

from kubetune.api.events import Event, parse_termination_message
from kubetune.api.spec import FinetuneRunSpec, FinetuneRunStatus
from kubetune.api.validation import format_errors, validate_spec
from kubetune.lifecycle.attempts import (
    AttemptView,
    Decision,
    create_refused_update,
    created_update,
    deadline_left,
    decide_attempt,
    ending,
    intent_update,
    invalid_spec,
    retry_delay,
    spec_to_run,
    wait_previous_update,
)
from kubetune.lifecycle.conditions import Notice, transition
from kubetune.lifecycle.fold import LogCursor, StatusFolder, Throttle
from kubetune.lifecycle.follow import (
    NOT_READ,
    NotRead,
    Step,
    after_stream,
    job_deleted,
    last_known,
    next_step,
    pod_replaced,
    stream_opened,
    trainer_failed,
    trainer_started,
    waiting_problem,
)
from kubetune.lifecycle.formats import now_rfc3339, parse_rfc3339
from kubetune.lifecycle.gang import all_started, gang_outcome, gang_pod_names, scheduling_timeout
from kubetune.lifecycle.observed import JobState, PodState, job_state, pod_state
from kubetune.lifecycle.outcome import FINISH_FIELDS, Outcome, finish_message, finish_update, outcome_of
from kubetune.lifecycle.policy import Refusal, admission, cancel_request, is_suspended
from kubetune.operator import manifests
from kubetune.operator.context import Context
from kubetune.operator.kube import (
    KubeError,
    jobs_path,
    pods_path,
    runs_path,
    services_path,
    split_log_line,
)
from kubetune.operator.settings import OperatorSettings

STREAM_BACKLOG_SECONDS = 5.0  # lines older than this when their stream opened are backlog, not live
RESYNC_SECONDS = 120.0  # a waiting supervisor re-reads its Job and pods this often (see maybe_resync)
WATCH_CATCH_UP_SECONDS = 10.0  # how long a pod gone from the API server may wait for its DELETED watch event
URGENT_EVENTS = frozenset({"started", "finished", "failed", "artifact"})


def admission_refusal(run: dict[str, Any], spec: FinetuneRunSpec, settings: OperatorSettings) -> Refusal | None:
    """Whether the platform refuses a valid run (:func:`kubetune.lifecycle.policy.admission`): its allow-list
    (``settings``), and whether the run config fits its attempt's pod template. The ``accept`` handler applies it
    to a new run, the supervisor before each attempt, ``spec_updated`` to an edit."""
    return admission(spec.resources, settings.platform_policy(),
                     config_bytes=manifests.config_bytes(run, spec, settings), config_limit=manifests.CONFIG_BUDGET)


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
        # How far the current pod's log was read: persisted in the status, so a restart reads on from there.
        self.cursor = LogCursor.from_status(self.status, str(self.status.get("podName") or ""))
        self.spec: FinetuneRunSpec | None = None  # the spec decisions use (see current_spec)
        self.spec_generation: int | None = None
        self.create_failures = 0  # refused Job creates in a row (backoff)
        self.stream_opened_at = 0.0
        self.waiting_reported: str | None = None
        self.stream_opened = False
        self.stream_complete = False  # the last log stream ended on the server's side (not cut, not stopped)
        self.next_resync = time.monotonic() + RESYNC_SECONDS * random.uniform(1.0, 1.25)
        self.pod_attempt: int | None = None  # the attempt whose pod status.podName names (this process's view)
        self.open_failures = 0  # log-open tries in a row that found no running container
        # The attempt judged as a unit (see _start_gang): a run over several pods, or one with a scheduling timeout.
        self.gang_attempt: int | None = None
        self.gang_nodes = 1
        self.gang_timeout: int | None = None
        self.gang_since = time.monotonic()
        self.gang_all_started = False
        # The log reader never waits on a status patch: it folds, then wakes follow_log, which flushes.
        self.flush_wanted = asyncio.Event()
        self.urgent_wanted = False

    # ------------------------------------------------------------------------------------ helpers
    @property
    def status(self) -> dict[str, Any]:
        return self.folder.status

    def typed_status(self) -> FinetuneRunStatus:
        """This process's view of the status (server state plus pending changes) as the typed model."""
        return FinetuneRunStatus.model_validate(self.status)

    def cancelled(self) -> bool:
        """A cancel was requested: the ``cancel`` handler owns the run's Jobs and status from now on."""
        return cancel_request(self.body.get("metadata")) is not None

    def suspended(self) -> bool:
        return is_suspended(self.body.get("spec"))

    def should_stop(self) -> bool:
        return self.gone or bool(self.stopped) or self.suspended() or self.cancelled()

    def run_object(self) -> dict[str, Any]:
        return {"apiVersion": self.body.get("apiVersion"), "kind": self.body.get("kind"),
                "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid,
                             "generation": (self.body.get("metadata") or {}).get("generation", 1)},
                "spec": dict(self.body.get("spec") or {})}

    def set_phase(self, phase: str, reason: str, message: str, *, event: str | None = "Normal") -> None:
        self.folder.update(transition(self.status, phase, reason, message, time.time()))
        if event:
            kopf.event(self.body, type=event, reason=reason, message=message[:1024])

    def report(self, notice: Notice) -> None:
        """Carry out a rule's :class:`~kubetune.lifecycle.conditions.Notice`: its patch (sent with the next
        flush) and its Event."""
        self.folder.update(notice.update)
        kopf.event(self.body, type=notice.event_type, reason=notice.reason, message=notice.message)

    async def flush(self, *, urgent: bool = False) -> None:
        """Send the coalesced status patch (if any). A non-urgent one waits for a token of the global patch rate
        first and is taken from the fold when the token is granted: it carries everything read meanwhile, so
        what goes out is never as old as the wait."""
        async with self.flush_lock:
            if not self.folder.has_pending or self.gone or self.cancelled():
                return  # a cancelled run's status is the cancel handler's (no stale phase over Cancelled)
            if not urgent:
                await self.ctx.patch_limiter().acquire()
                if self.gone or self.cancelled():
                    return
            patch, written = self.folder.take_patch()
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
            with contextlib.suppress(Exception):
                if not self.gone and (self.cancelled() or self.suspended()):
                    # The cancel/suspend handler deleted the Jobs it saw; one created concurrently is
                    # deleted here, so a terminal or suspended run never keeps a trainer.
                    await self.ctx.kube.delete_collection(jobs_path(self.namespace),
                                                          f"{manifests.RUN_LABEL}={self.key[1]}")

    async def _run(self) -> None:
        while not self.should_stop():
            spec = await self.current_spec()
            if spec is None:
                return
            job = await self.ensure_attempt(spec)
            if job is None:
                return
            outcome = await self.follow_attempt(job)
            if outcome is None or self.cancelled():
                return  # cancelled: the trainer's exit (143 on SIGTERM) is no failure to retry
            await self.finish_attempt(outcome)
            if outcome.action != "retry":
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), timeout=retry_delay(self.status.get("retries")))

    # ------------------------------------------------------------------------------------ spec
    async def current_spec(self) -> FinetuneRunSpec | None:
        """The spec the next decision uses (:func:`kubetune.lifecycle.attempts.spec_to_run`); ``self.spec`` is
        the last valid one. None: nothing valid to run. A live spec the platform refuses (:func:`admission_refusal`)
        counts as invalid: the edit is not applied, and a run left with nothing else fails with the refusal's
        reason. (The spec read back from the running attempt's Job is not judged again here: that attempt keeps
        it; :meth:`ensure_attempt` checks the spec of each new attempt.)"""
        live = self.body.get("spec") or {}
        model, errors = validate_spec(live)
        problem = format_errors(errors)
        refusal = None if model is None else self.admission(model)
        if refusal is not None:
            model, problem = None, refusal.detail
        last_valid: bool | None = True if self.spec is not None else None
        while True:
            source = spec_to_run(live_valid=model is not None, last_valid=last_valid,
                                 ran_once=bool(self.status.get("attempts")))
            if source != "read_attempt_spec":
                break
            self.spec, self.spec_generation = await self._applied_spec()
            last_valid = self.spec is not None
        if source == "live":
            self.spec = model
            self.spec_generation = (self.body.get("metadata") or {}).get("generation")
            return model
        if source == "last_valid":
            self.logger.info(f"Spec not applied ({problem}); going on with generation {self.spec_generation}.")
            return self.spec
        change = refusal.change() if refusal is not None else invalid_spec(problem)
        self.logger.info(f"Not starting: {change.message}")
        if source == "fail":
            if refusal is not None:
                self.folder.update(refusal.update(self.status, time.time()))
                kopf.event(self.body, type="Warning", reason=refusal.reason, message=refusal.message[:1024])
            else:
                self.set_phase(change.phase, change.reason, change.message[:1024], event="Warning")
            await self.flush(urgent=True)
        return None

    def admission(self, spec: FinetuneRunSpec) -> Refusal | None:
        return admission_refusal(self.run_object(), spec, self.ctx.settings)

    async def _applied_spec(self) -> tuple[FinetuneRunSpec | None, int | None]:
        """The (resolved) spec and generation the current attempt's Job was built from, if it still exists and
        carries one (:func:`kubetune.operator.manifests.applied_spec`)."""
        job_name = self.status.get("jobName")
        job = await self.ctx.kube.get(jobs_path(self.namespace, str(job_name))) if job_name else None
        return manifests.applied_spec(job)

    # ------------------------------------------------------------------------------------ attempts
    async def ensure_attempt(self, spec: FinetuneRunSpec) -> str | None:
        """Name of the current attempt's Job, creating it when needed (see
        :func:`kubetune.lifecycle.attempts.decide_attempt` for the rules); None when the run ended here."""
        while not self.should_stop():
            status = self.typed_status()
            view = AttemptView.from_status(status)
            if view.restarting and view.attempts > 0:
                # Restarting=True is persisted between a retryable failure and the next attempt's Job: a restart
                # in that window goes on with the retry instead of re-judging (and re-counting) the failure.
                self.retry_pending = True
            job_exists = True
            if view.created and view.job_name:
                job_exists = (self.ctx.children.job(self.namespace, view.job_name) is not None
                              or await self.ctx.kube.get(jobs_path(self.namespace, view.job_name)) is not None)
            now = time.time()
            left = deadline_left(spec.run_policy.active_deadline_seconds, status, now)
            decision = decide_attempt(view, run_name=self.name, retry_pending=self.retry_pending,
                                      job_exists=job_exists, alive_pods=self._alive_pods(), deadline_left=left)
            if decision.action == "create":
                # Before an irreversible create, the index is checked against the API server: right after an
                # operator restart the pod watch may not have listed the previous attempt's pods yet.
                await self._resync_pods()
                decision = decide_attempt(view, run_name=self.name, retry_pending=self.retry_pending,
                                          job_exists=job_exists, alive_pods=self._alive_pods(), deadline_left=left)
            if decision.action == "follow":
                return decision.job_name
            end = ending(decision)
            if end is not None:
                self.set_phase(end.phase, end.reason, end.message, event="Warning")
                await self.flush(urgent=True)
                return None
            if decision.action == "wait_previous":
                await self._stop_previous(decision)
                continue
            refusal = self.admission(spec)
            if refusal is not None:
                # The spec read back from the last attempt's Job, which the platform's policy no longer admits
                # (it changed, and the operator restarted): no new Job.
                self.folder.update(refusal.update(self.status, now))
                kopf.event(self.body, type="Warning", reason=refusal.reason, message=refusal.message[:1024])
                await self.flush(urgent=True)
                return None
            if decision.new_attempt:
                # Recorded now, written with the Created (or JobCreateFailed) patch: see intent_update.
                generation = (self.body.get("metadata") or {}).get("generation")
                self.folder.update(intent_update(status, decision, generation=generation,
                                                 attempt_generation=self.spec_generation, now=now))
                self.retry_pending = False
            try:
                return await self.create_attempt(spec, decision.attempt, reason=decision.reason)
            except KubeError as e:
                if e.status == 409 or e.transient:
                    raise  # kopf restarts the daemon; the same attempt is adopted or created then
                await self._create_refused(decision.job_name, e)
        return None

    def _alive_pods(self) -> list[tuple[int, str]]:
        return [(attempt, pod.name) for attempt, pod in self.ctx.children.pods(self.key) if pod.alive]

    async def _resync_pods(self) -> None:
        pods = await self.ctx.kube.list(pods_path(self.namespace), f"{manifests.RUN_LABEL}={self.key[1]}")
        self.ctx.children.resync_pods(self.key, pods)

    async def _stop_previous(self, decision: Decision) -> None:
        """Never two trainers: the still-active Jobs of earlier attempts are deleted, and ``decision``'s attempt
        waits until their pods (``decision.waiting_for``) have stopped (a deleted pod runs on for its grace
        period)."""
        attempt = decision.attempt
        update = wait_previous_update(self.status, decision)
        if update is not None:
            self.folder.update(update)
            await self.flush(urgent=True)
        for job in await self.ctx.kube.list(jobs_path(self.namespace), f"{manifests.RUN_LABEL}={self.key[1]}"):
            meta = job.get("metadata") or {}
            name = meta.get("name", "")
            state = job_state(job)
            if (meta.get("labels") or {}).get(manifests.ATTEMPT_LABEL) != str(attempt) \
                    and not (state.failed or state.complete):
                self.logger.info(f"Deleting the still-active Job {name} before attempt {attempt}.")
                await self.ctx.kube.delete(jobs_path(self.namespace, name))
        self.changed.clear()
        await self.wait_change(5.0)
        if not self.changed.is_set():
            await self._resync_pods()  # a missed watch event must not keep the run waiting

    async def _create_refused(self, job_name: str, error: KubeError) -> None:
        """The API server refused the attempt's Job (a missing PriorityClass, an invalid
        toleration, a quota): :func:`kubetune.lifecycle.attempts.create_refused_update` says what to write and
        how long to wait before the same attempt is created again."""
        self.create_failures += 1
        refusal = create_refused_update(self.status, job_name, error=error.message, reason=error.reason,
                                        failures=self.create_failures, now=time.time())
        self.folder.update(refusal.update)
        if refusal.warn:
            kopf.event(self.body, type="Warning", reason="JobCreateFailed", message=refusal.update["message"][:1024])
        await self.flush(urgent=True)
        self.ctx.metrics.jobs_refused.inc()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopped.wait(), timeout=refusal.delay)

    async def create_attempt(self, spec: FinetuneRunSpec, attempt: int, *, reason: str) -> str | None:
        ctx = self.ctx
        run = self.run_object()
        capabilities = await ctx.server_capabilities()
        build = await self._job_builder(spec, attempt)
        job = build()
        with ctx.metrics.timed("create_attempt"):
            # The Job carries this attempt's spec in its (immutable) pod template: nothing else to write first.
            rank0, created = await self._create_owned(jobs_path(self.namespace), job)
            await self._ensure_gang(run, spec, attempt, rank0, build)
        job_name = job["metadata"]["name"]
        if self.should_stop():
            if not self.gone and (self.cancelled() or self.suspended()):
                # Cancelled or suspended while creating: the handler may have deleted the Jobs before this
                # one existed. (An operator shutting down keeps it: the next leader follows it.)
                await ctx.kube.delete(jobs_path(self.namespace, job_name))
            return None
        self.create_failures = 0
        self.folder.update(created_update(self.typed_status(), job_name, attempt, time.time()))
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

    async def _job_builder(self, spec: FinetuneRunSpec, attempt: int) -> Callable[..., dict[str, Any]]:
        """:func:`kubetune.operator.manifests.job` for this attempt; called with ``node_rank`` and
        ``rendezvous`` for the other node ranks of a run over several pods."""
        left = deadline_left(spec.run_policy.active_deadline_seconds, self.typed_status(), time.time())
        return functools.partial(manifests.job, self.run_object(), spec, self.ctx.settings, attempt=attempt,
                                 resume_from=self.status.get("checkpoint"),
                                 active_deadline_seconds=int(left) if left is not None else None,
                                 capabilities=await self.ctx.server_capabilities())

    async def _ensure_gang(self, run: dict[str, Any], spec: FinetuneRunSpec, attempt: int,
                           rank0: Mapping[str, Any], build: Callable[..., dict[str, Any]]) -> None:
        """The rest of an attempt over several pods (:func:`kubetune.operator.manifests.gang_mode`), after its
        rank-0 Job ``rank0``: the rendezvous Service (owned by that Job), then, without Indexed Jobs, one Job per
        other node rank, given the Service's address. Idempotent: what exists is adopted."""
        mode = manifests.gang_mode(spec, await self.ctx.server_capabilities())
        if mode == "single":
            return
        owner = str((rank0.get("metadata") or {}).get("uid"))
        service, _ = await self._create_owned(
            services_path(self.namespace), manifests.rendezvous_service(run, attempt, mode, rank0), owner_uid=owner)
        if mode == "indexed":
            return
        address = manifests.rendezvous_address(run, attempt, mode, (service.get("spec") or {}).get("clusterIP"))
        for rank in range(1, spec.resources.nodes):
            await self._create_owned(jobs_path(self.namespace), build(node_rank=rank, rendezvous=address))

    async def _create_owned(self, collection: str, obj: dict[str, Any],
                            owner_uid: str | None = None) -> tuple[dict[str, Any], bool]:
        existing, created = await self.ctx.kube.create(collection, obj)
        if not created:
            self._check_owner(obj, existing, owner_uid or self.uid)
        return existing, created

    def _check_owner(self, obj: Mapping[str, Any], existing: Mapping[str, Any], owner_uid: str) -> None:
        owners = {ref.get("uid") for ref in (existing.get("metadata") or {}).get("ownerReferences") or ()}
        if owner_uid not in owners:
            raise kopf.TemporaryError(
                f"{obj['kind']} {obj['metadata']['name']} exists and belongs to someone else "
                "(an earlier run of the same name being deleted?)", delay=5)

    # ------------------------------------------------------------------------------------ following
    async def follow_attempt(self, job_name: str) -> Outcome | None:
        """Follow the attempt's pod(s) until the attempt ends (its outcome) or the run must stop (None). Each
        round observes the watch index and carries out :func:`kubetune.lifecycle.follow.next_step`."""
        attempt = int(self.status.get("attempts") or 1)
        job_gone = pods_read = False
        self._start_gang(attempt)
        if self.gang_attempt is not None:
            await self._resume_gang(job_name, attempt)
        while not self.should_stop():
            self.changed.clear()
            verdict = self._gang_verdict()
            if verdict is not None:
                return self._unit_ended(attempt, verdict)
            step = next_step(self.ctx.children.pod(self.key, attempt), self.ctx.children.job(self.namespace, job_name),
                             followed_pod=self.status.get("podName"), same_attempt_pod=self.pod_attempt == attempt,
                             job_gone=job_gone, pods_read=pods_read,
                             ended_pod=self.ctx.children.ended_pod(self.key, attempt))
            self._log_step("next", step)
            if step.action == "read_pods":
                await self._resync_pods()
                pods_read = True
                continue
            if step.action == "job_deleted":
                end = job_deleted(job_name)
                self.set_phase(end.phase, end.reason, end.message, event="Warning")
                await self.flush(urgent=True)
                return None
            if step.action == "finish":
                return await self._finish_step(step, job_name)
            if step.action == "wait":
                if step.pod is not None:
                    await self._report_waiting(step.pod)
                await self.maybe_flush()
                await self.wait_change(step.timeout)
                await self.maybe_resync(job_name)
                job_gone = (step.check_job_gone and self.ctx.children.job(self.namespace, job_name) is None
                            and await self.ctx.kube.get(jobs_path(self.namespace, job_name)) is None)
                continue
            pod = step.pod
            assert pod is not None  # follow_log / replaced
            previous = self.status.get("podName")
            if previous != pod.name:
                if step.action == "replaced":
                    self.report(pod_replaced(str(previous), pod.name, attempt))
                    self.cursor = LogCursor()
                    self.folder.started = self.folder.finished = False
                    self.folder.last_failed = None
                self.pod_attempt = attempt
                self.folder.update({"podName": pod.name})
            opened = await self.follow_log(pod.name)
            if self.should_stop():
                return None
            verdict = self._gang_verdict()
            if verdict is not None:
                return self._unit_ended(attempt, verdict)
            self.open_failures = 0 if opened else self.open_failures + 1
            step = await self._after_stream(pod, opened, job_name)
            if step.action == "finish":
                return await self._finish_step(step, job_name)
            if step.timeout:
                await self.wait_change(step.timeout)
        return None

    def _start_gang(self, attempt: int) -> None:
        """Following starts: a run over several pods (or with a scheduling timeout) is judged as a unit too."""
        spec = self.spec
        nodes = spec.resources.nodes if spec is not None else 1
        timeout = spec.run_policy.scheduling_timeout(nodes) if spec is not None else None
        self.gang_attempt = attempt if nodes > 1 else None
        self.gang_nodes, self.gang_timeout = nodes, timeout
        self.gang_since, self.gang_all_started = time.monotonic(), False

    async def _resume_gang(self, job_name: str, attempt: int) -> None:
        """Following an attempt over several pods whose rank-0 Job is still active (after an operator restart,
        perhaps between creating its Jobs): the rest of the unit is created if missing, from that Job's spec."""
        raw = await self.ctx.kube.get(jobs_path(self.namespace, job_name))
        spec, _ = manifests.applied_spec(raw)
        if raw is None or spec is None or job_state(raw).ended:
            return
        await self._ensure_gang(self.run_object(), spec, attempt, raw, await self._job_builder(spec, attempt))

    def _unit_ended(self, attempt: int, verdict: Outcome) -> Outcome:
        self.logger.info(f"Attempt {attempt} ends as a unit: {verdict.reason}: {verdict.message}")
        return verdict

    def _gang_verdict(self) -> Outcome | None:
        """The attempt's outcome when one of its pods decides it or it waited too long for its pods
        (:mod:`kubetune.lifecycle.gang`); None while node rank 0 decides. Also lists the pods in status."""
        attempt = self.gang_attempt if self.gang_attempt is not None else int(self.status.get("attempts") or 1)
        pods = self.ctx.children.attempt_pods(self.key, attempt)
        if self.gang_attempt is not None:
            names = gang_pod_names(pods, self.gang_nodes)
            if names != self.status.get("pods"):
                self.folder.update({"pods": names})
        rank0 = self.ctx.children.ended_pod(self.key, attempt)
        if rank0 is not None and rank0.succeeded:
            return None  # the result is in; the other pods end on their own
        backoff_limit = self.spec.run_policy.backoff_limit if self.spec is not None else 0
        verdict = (gang_outcome(pods, retries=int(self.status.get("retries") or 0), backoff_limit=backoff_limit)
                   if self.gang_attempt is not None else None)
        if verdict is None and not self.gang_all_started:
            verdict = scheduling_timeout(pods, nodes=self.gang_nodes, waited=time.monotonic() - self.gang_since,
                                         timeout=self.gang_timeout)
            self.gang_all_started = all_started(pods, self.gang_nodes)
        return verdict

    async def _after_stream(self, pod: PodState, opened: bool, job_name: str) -> Step:
        """:func:`kubetune.lifecycle.follow.after_stream`, reading the pod and the Job when (and in the order)
        it asks for them."""
        state: PodState | NotRead | None = NOT_READ
        job: JobState | NotRead | None = NOT_READ
        while True:
            step = after_stream(pod, opened=opened, state=state, job=job, open_failures=self.open_failures)
            self._log_step("after stream", step)
            if step.action == "read_pod":
                fresh = await self.ctx.kube.get(pods_path(self.namespace, pod.name))
                if fresh is not None:
                    state = last_known(pod.name, pod_state(fresh), None)
                else:
                    state = last_known(pod.name, None, await self._watched_final(pod.name))
            elif step.action == "read_job":
                job = await self._job_state(job_name)
            else:
                return step

    def _log_step(self, where: str, step: Step) -> None:
        # What each decision saw, so that a run judged wrongly can be traced from the operator's debug log.
        pod = step.pod
        seen = "" if pod is None else (f" pod {pod.name} phase={pod.phase} exit={pod.exit_code} "
                                       f"deleting={pod.deleting} gone={pod.gone} message={bool(pod.message)}")
        job = "" if step.job is None else f" job ended={step.job.ended}"
        self.logger.debug(f"Follow step ({where}): {step.action}{seen}{job}")

    async def _watched_final(self, name: str) -> PodState | None:
        """The watch's last state of pod ``name``, which the API server no longer has. The watch's DELETED event
        carries the pod's final status (with the trainer's termination message) and can arrive after the pod is
        gone from the API server, so it is waited for, at most ``WATCH_CATCH_UP_SECONDS``."""
        deadline = time.monotonic() + WATCH_CATCH_UP_SECONDS
        while True:
            watched = self.ctx.children.pod_named(self.key, name)
            if watched is None or watched.gone or time.monotonic() >= deadline:
                return watched
            self.changed.clear()
            await self.wait_change(max(0.0, deadline - time.monotonic()))

    async def _finish_step(self, step: Step, job_name: str) -> Outcome:
        """The attempt ended: what the trainer wrote last (its log's rest, its termination message), then the
        outcome of its pod with its Job."""
        if step.drain_log and step.pod is not None:
            await self._drain_log(step.pod.name)
        if step.fold_summary and step.pod is not None:
            self._fold_summary(step.pod)
        job = await self._job_state(job_name) if step.read_job else step.job
        backoff_limit = self.spec.run_policy.backoff_limit if self.spec is not None else 0
        return outcome_of(step.pod, job, failed_event=self.folder.last_failed,
                          retries=int(self.status.get("retries") or 0), backoff_limit=backoff_limit)

    async def maybe_resync(self, job_name: str) -> None:
        """Safety net for a missed watch event: while waiting for the attempt's pod, re-read its Job and pods
        from the API server every ``RESYNC_SECONDS`` (jittered) into the index, so that a stale index (a watch
        that lost an event across an API server restart) cannot keep a run waiting for ever."""
        now = time.monotonic()
        if now < self.next_resync:
            return
        self.next_resync = now + RESYNC_SECONDS * random.uniform(1.0, 1.25)
        # From the watch cache: after an API server restart that is rebuilt from etcd, which is all a missed
        # watch event needs; a thousand waiting runs do not become a thousand quorum reads.
        job = await self.ctx.kube.get(jobs_path(self.namespace, job_name), {"resourceVersion": "0"})
        pods = await self.ctx.kube.list(pods_path(self.namespace), f"{manifests.RUN_LABEL}={self.key[1]}",
                                        cached=True)
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

    def _fold_summary(self, pod: PodState) -> None:
        """The trainer's final summary from its termination message, when its log did not deliver it (the
        stream cut, the operator down, the pod removed before its log was read): the result never depends on
        the log."""
        if self.folder.finished or self.folder.last_failed is not None:
            return
        for event in parse_termination_message(pod.message):
            self.folder.fold_event(event, event.time)
            if event.type == "failed":
                self.folder.update(trainer_failed(event))

    async def _job_state(self, job_name: str) -> JobState | None:
        raw = await self.ctx.kube.get(jobs_path(self.namespace, job_name))
        return job_state(raw) if raw is not None else None

    async def _report_waiting(self, pod: PodState) -> None:
        notice = waiting_problem(pod, self.waiting_reported)
        if notice is not None:
            self.waiting_reported = notice.reason
            self.report(notice)

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
        wanted = asyncio.ensure_future(self.flush_wanted.wait())
        # A run over several pods also wakes when another of its pods changes (that pod may end the attempt), and
        # a scheduling timeout is looked at on every wake-up.
        as_unit = self.gang_attempt is not None or (self.gang_timeout is not None and not self.gang_all_started)
        watched = asyncio.ensure_future(self.changed.wait()) if as_unit else None
        try:
            while not reader.done():
                await asyncio.wait({reader, stopper, wanted, *([watched] if watched else [])},
                                   timeout=self.throttle.delay(time.time()) or self.ctx.settings.status_interval,
                                   return_when=asyncio.FIRST_COMPLETED)
                if self.should_stop():
                    break
                if watched is not None:
                    if watched.done():
                        self.changed.clear()
                        watched = asyncio.ensure_future(self.changed.wait())
                    if self._gang_verdict() is not None:
                        break
                if wanted.done():
                    self.flush_wanted.clear()
                    wanted = asyncio.ensure_future(self.flush_wanted.wait())
                urgent, self.urgent_wanted = self.urgent_wanted, False
                await self.maybe_flush(urgent=urgent)
        finally:
            metrics.log_streams.dec()
            stopper.cancel()
            wanted.cancel()
            if watched is not None:
                watched.cancel()
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
            if not self.stream_opened and reader.done() and not reader.cancelled():
                metrics.log_open_errors.inc()
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
        self.stream_opened_at = time.time()
        if self.cursor.last_ts is None:
            self.folder.tail.clear()  # the whole log replays: rebuild the tail from it, without duplicates
        notice = stream_opened(self.status, pod_name, written_phase=self.phase, now=time.time())
        if notice is not None:
            self.report(notice)
            self.want_flush(urgent=True)

    async def _read(self, pod_name: str, params: dict[str, Any]) -> None:
        async def opened() -> None:
            await self._on_stream_open(pod_name)

        async for raw in self.ctx.kube.stream_lines(pods_path(self.namespace, pod_name, "log"), params,
                                                    on_open=opened):
            stamp, text = split_log_line(raw)
            t = parse_rfc3339(stamp) if stamp else None
            if not self.cursor.accept(t, stamp):
                continue  # replayed after a reconnect or a restart: already folded
            if t is not None and t >= self.stream_opened_at - STREAM_BACKLOG_SECONDS:
                # Delivery latency of live lines only: a backlog written while no stream was open (the
                # operator restarting, the API server away) is not what this histogram measures.
                self.ctx.metrics.log_delivery.observe(max(0.0, time.time() - t))
            cursor = self.cursor.to_status(pod_name)
            if cursor is not None:
                self.folder.update({"logCursor": cursor})
            event = self.folder.feed_line(text, t if t is not None else time.time())
            if event is not None:
                self._on_event(event)

    def _on_event(self, event: Event) -> None:
        self.ctx.metrics.trainer_events.labels(type=event.type).inc()
        urgent = event.type in URGENT_EVENTS
        if event.type == "started":
            notice = trainer_started(self.status, time.time())
            if notice is not None:
                self.report(notice)
        if event.type == "failed":
            self.folder.update(trainer_failed(event))
        self.want_flush(urgent=urgent)

    def want_flush(self, *, urgent: bool) -> None:
        """Ask follow_log's loop for a flush (at once when ``urgent``, else when the throttle allows)."""
        self.urgent_wanted = self.urgent_wanted or urgent
        if urgent or self.throttle.due(time.time(), urgent=False):
            self.flush_wanted.set()

    # ------------------------------------------------------------------------------------ outcome
    async def _stop_previous_attempt(self) -> None:
        """After an attempt that did not succeed, its Jobs that are still active are deleted: before a retry (the
        Job controller may have replaced a lost pod meanwhile), so two trainers of one run never write the same
        checkpoints; for a run over several pods, whose other pods wait in a broken process group (or a
        rendezvous nobody else joins); for pods never scheduled. A finished Job stays (history)."""
        attempt = self.status.get("attempts")
        if not self.status.get("jobName") or not attempt:
            return
        selector = f"{manifests.RUN_LABEL}={self.key[1]},{manifests.ATTEMPT_LABEL}={attempt}"
        for raw in await self.ctx.kube.list(jobs_path(self.namespace), selector):
            job = job_state(raw)
            if not (job.failed or job.complete):
                self.logger.info(f"Deleting the still-active Job {job.name} of attempt {attempt}.")
                await self.ctx.kube.delete(jobs_path(self.namespace, job.name))

    async def finish_attempt(self, outcome: Outcome) -> None:
        """Record the attempt's outcome (:func:`kubetune.lifecycle.outcome.finish_update`); unless it succeeded,
        stop the attempt's Jobs that are still active."""
        # Only the fields finish_update reads are typed: a progress field the fold took from a malformed trainer
        # event (one the API server refused) must not keep the attempt's end from being recorded.
        status = FinetuneRunStatus.model_validate({k: v for k, v in self.status.items() if k in FINISH_FIELDS})
        self.folder.update(finish_update(outcome, status, time.time()))
        kopf.event(self.body, type="Normal" if outcome.action == "succeed" else "Warning", reason=outcome.reason,
                   message=finish_message(outcome, status)[:1024])
        if outcome.action == "retry":
            self.retry_pending = True
        if outcome.action != "succeed":
            # a failed pod's Job has ended already; what is left is a unit's other pods, or pods never scheduled
            await self._stop_previous_attempt()
        await self.flush(urgent=True)
