"""What the operator observes of an attempt's Kubernetes objects, read into small frozen values. Pure.

The rules that judge these values live in :mod:`.follow` (what to do next) and :mod:`.outcome` (what an
ended attempt means); nothing here decides anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kubetune.lifecycle.formats import parse_rfc3339


@dataclasses.dataclass(frozen=True)
class PodState:
    name: str
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    exit_code: int | None = None
    reason: str | None = None  # terminated reason (OOMKilled, Error, Completed) or pod reason (Evicted)
    message: str | None = None
    waiting_reason: str | None = None  # ImagePullBackOff, CreateContainerConfigError, ...
    started: bool = False  # the trainer container has started (its log can be followed)
    created: float | None = None
    scheduled: bool = False  # bound to a node: its log can be followed as soon as the container starts
    deleting: bool = False  # has a deletionTimestamp: deleted (by a user, a drain) and going away
    gone: bool = False  # removed from the API server; this is the last state the watch reported

    @property
    def terminated(self) -> bool:
        return self.phase in {"Succeeded", "Failed"}

    @property
    def succeeded(self) -> bool:
        """The trainer exited 0: the attempt's result is known even if the pod is deleted right after."""
        return self.terminated and self.exit_code == 0

    @property
    def alive(self) -> bool:
        """A trainer that may still run (and write checkpoints): neither terminated nor removed."""
        return not self.gone and not self.terminated


def pod_state(pod: Mapping[str, Any], container: str = "trainer") -> PodState:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    # a pod the scheduler cannot place says why in its PodScheduled condition ("0/3 nodes are available: ...")
    unschedulable: Mapping[str, Any] = next((c for c in status.get("conditions") or ()
                                             if c.get("type") == "PodScheduled" and c.get("status") == "False"), {})
    state = PodState(name=meta.get("name", ""), phase=status.get("phase") or "Pending",
                     reason=status.get("reason") or unschedulable.get("reason"),
                     message=status.get("message") or unschedulable.get("message"),
                     created=parse_rfc3339(meta.get("creationTimestamp")),
                     scheduled=bool((pod.get("spec") or {}).get("nodeName")),
                     deleting=bool(meta.get("deletionTimestamp")))
    for cs in status.get("containerStatuses") or ():
        if cs.get("name") != container:
            continue
        st = cs.get("state") or {}
        last = cs.get("lastState") or {}
        term = st.get("terminated") or last.get("terminated")
        if term:
            return dataclasses.replace(state, exit_code=term.get("exitCode"),
                                       reason=term.get("reason") or state.reason,
                                       message=term.get("message") or state.message, started=True)
        if "running" in st:
            return dataclasses.replace(state, started=True)
        waiting = st.get("waiting") or {}
        return dataclasses.replace(state, waiting_reason=waiting.get("reason"),
                                   message=waiting.get("message") or state.message)
    return state


@dataclasses.dataclass(frozen=True)
class JobState:
    name: str
    complete: bool = False
    failed: bool = False
    reason: str | None = None
    message: str | None = None

    @property
    def ended(self) -> bool:
        """Complete or Failed: the Job starts no more pods."""
        return self.complete or self.failed


def job_state(job: Mapping[str, Any]) -> JobState:
    name = (job.get("metadata") or {}).get("name", "")
    for cond in (job.get("status") or {}).get("conditions") or ():
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return JobState(name, complete=True, reason=cond.get("reason"), message=cond.get("message"))
        if cond.get("type") == "Failed":
            return JobState(name, failed=True, reason=cond.get("reason"), message=cond.get("message"))
    return JobState(name)
