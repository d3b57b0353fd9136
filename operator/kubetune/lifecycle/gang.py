"""One attempt over several pods (``spec.resources.nodes`` > 1): the pods start, train and end as one unit. Pure.

torchrun's processes in the pods form one process group; a pod that is lost cannot rejoin it (its peers' group is
broken, and its replacement would wait for a rendezvous nobody else joins). So the operator judges the unit:

1. a pod of any node rank removed, or being deleted, before it succeeded: the attempt is lost (``PodDeleted``:
   retried from the latest checkpoint while retries are left), even when rank 0 then reports a failure of its
   own (its peer vanished);
2. a pod of node rank ≥ 1 that ended on a cause of its own — evicted, preempted, out of memory, killed, or a
   trainer exit code with a meaning (75 retryable; 65 bad data, 78 bad config: permanent) — decides the attempt
   as it would for one pod;
3. otherwise node rank 0 decides, as for one pod (its pod holds global rank 0: the log, the termination message
   and the artifact). A rank ≥ 1 that exited 1 is most often the echo of a failure elsewhere (its peer closed
   the connection); rank 0 ends right after it and says what happened.

Pods that are not all running ``schedulingTimeoutSeconds`` after the attempt's Jobs were created fail the run
(``SchedulingTimeout``): the pods already placed hold their GPUs while they wait for the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

from kubetune.api.events import EXIT_BAD_CONFIG, EXIT_BAD_DATA, RETRYABLE_EXIT_CODES
from kubetune.lifecycle.formats import clip
from kubetune.lifecycle.observed import PodState
from kubetune.lifecycle.outcome import POD_DELETED, Outcome, attempt_outcome

#: Exit codes and pod reasons of a rank ≥ 1 that say what happened (rule 2), not just that a peer vanished.
CAUSE_EXIT_CODES = frozenset({EXIT_BAD_CONFIG, EXIT_BAD_DATA, *RETRYABLE_EXIT_CODES})
CAUSE_REASONS = frozenset({"OOMKilled", "Evicted", "Preempted", "Shutdown"})


def gang_outcome(pods: Sequence[tuple[int, PodState]], *, retries: int, backoff_limit: int) -> Outcome | None:
    """The attempt's outcome decided by one of its pods (rules 1 and 2), or None: rank 0 decides. ``pods``: every
    pod of the attempt seen so far, with its node rank."""
    for rank, pod in sorted(pods, key=lambda rp: (rp[0], rp[1].name)):
        if (pod.gone or pod.deleting) and not pod.succeeded:
            return _with_pod(attempt_outcome(exit_code=None, pod_reason=POD_DELETED, retries=retries,
                                             backoff_limit=backoff_limit), rank, pod, "was lost")
    for rank, pod in sorted(pods, key=lambda rp: (rp[0], rp[1].name)):
        if rank == 0 or not pod.terminated or pod.succeeded:
            continue
        if pod.exit_code in CAUSE_EXIT_CODES or pod.reason in CAUSE_REASONS:
            return _with_pod(attempt_outcome(exit_code=pod.exit_code, pod_reason=pod.reason, retries=retries,
                                             backoff_limit=backoff_limit), rank, pod, "ended")
    return None


def _with_pod(outcome: Outcome, rank: int, pod: PodState, what: str) -> Outcome:
    return Outcome(outcome.action, outcome.reason,
                   clip(f"Pod {pod.name} (node rank {rank}) {what}; every pod of the attempt is stopped. "
                        f"{outcome.message}") or "")


def newest_by_rank(pods: Sequence[tuple[int, PodState]]) -> dict[int, PodState]:
    """Each node rank's newest pod that still exists."""
    newest: dict[int, PodState] = {}
    for rank, pod in pods:
        if not pod.gone and (rank not in newest or (pod.created or 0.0, pod.name) > (newest[rank].created or 0.0,
                                                                                      newest[rank].name)):
            newest[rank] = pod
    return newest


def gang_pod_names(pods: Sequence[tuple[int, PodState]], nodes: int) -> list[str]:
    """``status.pods``: each node rank's newest pod, in rank order ("" for a rank with none yet)."""
    newest = newest_by_rank(pods)
    return [newest[rank].name if rank in newest else "" for rank in range(nodes)]


def all_started(pods: Sequence[tuple[int, PodState]], nodes: int) -> bool:
    """Every node rank has a pod whose trainer started (or already ended)."""
    newest = newest_by_rank(pods)
    return all(rank in newest and (newest[rank].started or newest[rank].terminated) for rank in range(nodes))


def scheduling_timeout(pods: Sequence[tuple[int, PodState]], *, nodes: int, waited: float,
                       timeout: float | None) -> Outcome | None:
    """``Fail`` (``SchedulingTimeout``) when, ``waited`` seconds after the attempt's Jobs were created, fewer than
    ``nodes`` of its pods have started and ``timeout`` has passed; None otherwise."""
    if timeout is None or waited < timeout or all_started(pods, nodes):
        return None
    newest = newest_by_rank(pods)
    started = [rank for rank, pod in newest.items() if pod.started or pod.terminated]
    waiting = [f"{pod.name}: {pod.waiting_reason or ('not scheduled' if not pod.scheduled else 'starting')}"
               + (f" ({pod.message})" if pod.message else "") for rank, pod in sorted(newest.items())
               if rank not in started]
    missing = nodes - len(newest)
    if missing > 0:
        waiting.append(f"{missing} pod(s) not created")
    return Outcome("fail", "SchedulingTimeout", clip(
        f"{len(started)} of {nodes} pods were running {int(timeout)} s after the attempt started "
        f"(spec.runPolicy.schedulingTimeoutSeconds); its pods are stopped. Waiting: {'; '.join(waiting)}") or "")
