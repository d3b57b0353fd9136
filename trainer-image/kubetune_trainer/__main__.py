"""``python -m kubetune_trainer --config run.yaml [--output-dir DIR] [--run-name NAME]``.

Exit codes (see :mod:`kubetune.api.events`): 0 done; 75 retryable (store or data source unreachable, SIGTERM:
preemption, eviction, suspend — the latest checkpoint is kept); 78 bad config (also a stale config or a missing
checkpoint, see :mod:`kubetune.api.trainer_env`); 65 bad data; 1 anything else. Every failure also emits a
``failed`` event with a CamelCase reason before the process exits, and on every exit rank 0 writes the final
events to the termination log (``KUBETUNE_TERMINATION_LOG``).

The ``KUBETUNE_*`` environment is read once, here, into a :class:`kubetune.api.trainer_env.TrainerEnv`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from kubetune.api.events import EXIT_BAD_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_RETRYABLE, parse_termination_message
from kubetune.api.spec import DEFAULT_GANG_SCHEDULING_SECONDS
from kubetune.api.trainer_env import RENDEZVOUS_PORT, TrainerEnv, variable

from .config import ConfigError, build_parser, resolve
from .events import Emitter
from .failures import classify, describe


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc N`` / ``--nproc=N``: the workers must not see it (torchrun's own parser reads
    ``--nproc`` as an ambiguous prefix of ``--nproc-per-node`` and exits)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


@dataclass(frozen=True)
class Nodes:
    """This pod's place in a run over several pods, for torchrun."""

    count: int
    rank: int
    rendezvous: str  # host:port of rank 0's rendezvous
    timeout_seconds: int
    run_id: str

    def torchrun_args(self) -> list[str]:
        """Static rendezvous on rank 0's c10d TCPStore: node rank N's processes get global ranks N·P … N·P+P-1,
        so global rank 0 (which writes events, the termination log and the artifact) is always in node rank 0's
        pod. (c10d's dynamic rendezvous orders nodes by host name instead.) Rank 0 hosts the store and reaches
        it on the loopback: a pod connecting to itself through a Service address needs hairpin NAT."""
        host, _, port = self.rendezvous.rpartition(":")
        return [f"--nnodes={self.count}", f"--node-rank={self.rank}", "--rdzv-backend=static",
                f"--master-addr={'127.0.0.1' if self.rank == 0 else host}", f"--master-port={port}",
                f"--rdzv-id={self.run_id}", f"--rdzv-conf=timeout={self.timeout_seconds}"]


def nodes_of(cfg_nodes: int, env: TrainerEnv, timeout_seconds: int | None, run_id: str) -> Nodes | None:
    """This pod's :class:`Nodes` for a run over ``cfg_nodes`` pods (None for one pod); a missing rank or
    rendezvous is a :class:`ConfigError` (the operator sets both)."""
    if cfg_nodes <= 1:
        return None
    rank = env.node_rank
    if rank is None or rank >= cfg_nodes:
        raise ConfigError(f"spec.resources.nodes is {cfg_nodes}: {variable('node_rank')} must be set to this pod's "
                          f"rank, 0 to {cfg_nodes - 1}, got {rank!r} (the operator sets it; local mode runs on one "
                          "machine: set nodes to 1)")
    rendezvous = env.rendezvous or (f"127.0.0.1:{RENDEZVOUS_PORT}" if rank == 0 else None)
    if rendezvous is None:
        raise ConfigError(f"spec.resources.nodes is {cfg_nodes}: node rank {rank} needs {variable('rendezvous')}, "
                          "rank 0's host:port")
    return Nodes(cfg_nodes, rank, rendezvous, timeout_seconds or DEFAULT_GANG_SCHEDULING_SECONDS, run_id)


def launch_torchrun(nproc: int, argv: list[str], termination_log: str | None, nodes: Nodes | None = None) -> int:
    """Re-run this program under torchrun with ``nproc`` processes on this node (and ``nodes``' other pods);
    the exit code is rank 0's.

    torchrun itself exits 1 whenever a worker fails, which would turn bad data (65) or an outage (75) into a
    permanent failure: the code is taken from the failed event rank 0 wrote to the termination log (a file of
    our own when the pod has none).
    """
    placement = ["--standalone"] if nodes is None else nodes.torchrun_args()
    cmd = [sys.executable, "-m", "torch.distributed.run", *placement, f"--nproc-per-node={nproc}",
           "-m", "kubetune_trainer", *without_nproc(argv)]
    own_log = None
    if termination_log is None:
        fd, own_log = tempfile.mkstemp(prefix="kubetune-termination-")
        os.close(fd)
        termination_log = own_log
    child = subprocess.Popen(cmd, env={**os.environ, variable("termination_log"): termination_log})

    def forward(signum: int, _frame: FrameType | None) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    try:
        code = child.wait()
        return code if code == EXIT_OK else rank_exit_code(Path(termination_log)) or code
    finally:
        if own_log is not None:
            Path(own_log).unlink(missing_ok=True)


def rank_exit_code(termination_log: Path) -> int | None:
    """The exit code of the last failed event in a termination log, if any."""
    try:
        text = termination_log.read_text(errors="replace")
    except OSError:
        return None
    failed = [e for e in parse_termination_message(text) if e.type == "failed"]
    code = (failed[-1].model_extra or {}).get("exit_code") if failed else None
    return code if isinstance(code, int) and not isinstance(code, bool) and code > 0 else None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        env, env_error = TrainerEnv.from_env(os.environ), None
    except ValueError as exc:  # reported as a failed run below, once there is an emitter
        env, env_error = TrainerEnv(), str(exc)
    logging.basicConfig(level=env.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    emitter = Emitter(enabled=int(os.environ.get("RANK", "0")) == 0)
    args = build_parser(env).parse_args(argv)
    try:
        if env_error is not None:
            raise ConfigError(env_error)
        cfg = resolve(args, env)
        nodes = nodes_of(cfg.spec.resources.nodes, env,
                         cfg.spec.run_policy.scheduling_timeout(cfg.spec.resources.nodes),
                         f"{env.run_uid or cfg.name}-a{env.attempt}")
    except ConfigError as exc:
        emitter.emit("failed", reason="InvalidConfig", message=str(exc)[:1000], retryable=False,
                     exit_code=EXIT_BAD_CONFIG)
        emitter.write_termination_message(env.termination_log_path())
        logging.getLogger("kubetune_trainer").error("%s", exc)
        return EXIT_BAD_CONFIG

    if "WORLD_SIZE" not in os.environ:
        resources = cfg.spec.resources
        nproc = args.nproc or resources.procs_per_node
        if nproc is None:
            import torch

            gpus = resources.gpus
            nproc = gpus if gpus > 1 and torch.cuda.device_count() >= gpus else 1
        if nproc > 1 or nodes is not None:
            # the rank-0 worker writes the termination log; this launcher emits nothing, so it writes nothing
            return launch_torchrun(nproc, argv, env.termination_log_path(), nodes)

    from .run import Preempted, StopFlag, Trainer

    stop = StopFlag()

    def on_sigterm(signum: int, _frame: FrameType | None) -> None:
        stop.requested = True
        if not stop.in_loop:  # outside the training loop there is no step boundary to wait for
            raise Preempted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    log = logging.getLogger("kubetune_trainer")
    try:
        Trainer(cfg, emitter, stop).run()
    except (Exception, Preempted) as exc:
        reason, code = classify(exc)
        if code == EXIT_FAILED:
            log.exception("the run failed")
        else:
            log.error("%s: %s", reason, exc)
        emitter.emit("failed", reason=reason, message=describe(exc)[:1000],
                     retryable=code == EXIT_RETRYABLE, exit_code=code)
        return code
    finally:
        # every way out (success, failure, SIGTERM, an escaping BaseException) leaves the summary behind first
        emitter.write_termination_message(env.termination_log_path())
        from .distributed import shutdown

        shutdown()
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
