"""Typed SDK/CLI errors. Each says what went wrong *and what to do*, and maps to a CLI exit code.

    try:
        run.save_artifact("model")
    except kubetune.RunNotFinished as exc:
        print(exc.hint)            # "wait for it: run.wait() or `kubetune wait NAME`"
"""

from __future__ import annotations

# CLI exit codes (documented in docs/sdk.md): 0 ok, 1 the run failed, 2 bad usage/config, 3 not found,
# 4 not finished yet, 5 the cluster or the store is unreachable, 6 artifact missing/corrupt, 7 missing extra,
# 70 a kubetune bug (sysexits' EX_SOFTWARE: an exception nobody expected), 130 interrupted, 141 the reader of
# its output went away (`kubetune list | head`: what a command killed by SIGPIPE reports).
EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_NOT_FINISHED = 4
EXIT_UNAVAILABLE = 5
EXIT_ARTIFACT = 6
EXIT_MISSING_EXTRA = 7
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class KubetuneError(Exception):
    """Base of every kubetune error: ``str(exc)`` is the problem, ``exc.hint`` what to do about it."""

    exit_code = EXIT_RUN_FAILED

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigInvalid(KubetuneError, ValueError):
    """The run file or the arguments are invalid."""

    exit_code = EXIT_USAGE


class RunNotFound(KubetuneError, LookupError):
    exit_code = EXIT_NOT_FOUND

    def __init__(self, name: str, namespace: str) -> None:
        super().__init__(f"FinetuneRun {namespace}/{name} not found",
                         "check the name and namespace: `kubetune list -n NAMESPACE`")
        self.name, self.namespace = name, namespace


class RunAlreadyExists(KubetuneError):
    exit_code = EXIT_USAGE

    def __init__(self, name: str, namespace: str) -> None:
        super().__init__(f"FinetuneRun {namespace}/{name} already exists",
                         "pick another run_name, or delete the old run: `kubectl delete ftr -n "
                         f"{namespace} {name}`")


class RunNotFinished(KubetuneError):
    """The run has not succeeded yet (still pending or running)."""

    exit_code = EXIT_NOT_FINISHED

    def __init__(self, name: str, phase: str | None) -> None:
        super().__init__(f"run {name} is {phase or 'not started yet'}, not Succeeded",
                         f"wait for it: run.wait() or `kubetune wait {name}`")
        self.phase = phase


class RunFailed(KubetuneError):
    exit_code = EXIT_RUN_FAILED

    def __init__(self, name: str, phase: str | None, reason: str | None, message: str | None) -> None:
        detail = f": {reason}" if reason else ""
        super().__init__(f"run {name} {str(phase or 'failed').lower()}{detail}" + (f" — {message}" if message else ""),
                         f"see `kubetune logs {name}` and `kubectl describe ftr {name}`")
        self.phase, self.reason, self.detail = phase, reason, message


class ArtifactMissing(KubetuneError, FileNotFoundError):
    exit_code = EXIT_ARTIFACT


class ArtifactCorrupt(KubetuneError):
    exit_code = EXIT_ARTIFACT


class ClusterUnavailable(KubetuneError, ConnectionError):
    exit_code = EXIT_UNAVAILABLE


class StorageUnavailable(KubetuneError, ConnectionError):
    exit_code = EXIT_UNAVAILABLE


class MissingExtra(KubetuneError, ImportError):
    """A feature needs an optional dependency group."""

    exit_code = EXIT_MISSING_EXTRA

    def __init__(self, feature: str, extra: str, module: str) -> None:
        super().__init__(f"{feature} needs the '{extra}' extra ({module} is not installed)",
                         f"pip install 'kubetune[{extra}]' (or scripts/install.sh {extra})")
        self.extra = extra


class LocalRunFailed(KubetuneError):
    exit_code = EXIT_RUN_FAILED

    def __init__(self, reason: str, message: str, exit_code: int, log_path: str) -> None:
        super().__init__(f"the local run failed: {reason}: {message}", f"full log: {log_path}")
        self.reason, self.trainer_exit_code, self.log_path = reason, exit_code, log_path
