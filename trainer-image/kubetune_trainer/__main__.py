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
from types import FrameType

from kubetune.api.events import EXIT_BAD_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_RETRYABLE
from kubetune.api.trainer_env import TrainerEnv

from .config import ConfigError, build_parser, resolve
from .events import Emitter
from .failures import classify


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


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this program under torchrun with ``nproc`` processes on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "kubetune_trainer", *without_nproc(argv)]
    child = subprocess.Popen(cmd)

    def forward(signum: int, _frame: FrameType | None) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    return child.wait()


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
    except ConfigError as exc:
        emitter.emit("failed", reason="InvalidConfig", message=str(exc)[:1000], retryable=False,
                     exit_code=EXIT_BAD_CONFIG)
        emitter.write_termination_message(env.termination_log_path())
        logging.getLogger("kubetune_trainer").error("%s", exc)
        return EXIT_BAD_CONFIG

    if "WORLD_SIZE" not in os.environ:
        nproc = args.nproc
        if nproc is None:
            import torch

            gpus = cfg.spec.resources.gpus
            nproc = gpus if gpus > 1 and torch.cuda.device_count() >= gpus else 1
        if nproc > 1:
            # the rank-0 worker writes the termination log; this launcher emits nothing, so it writes nothing
            return launch_torchrun(nproc, argv)

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
        emitter.emit("failed", reason=reason, message=f"{type(exc).__name__}: {exc}"[:1000],
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
