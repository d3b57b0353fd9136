"""``kubetune``: the command line, with kubectl's habits. Every command is a thin shell over
:mod:`kubetune.sdk.client`, :mod:`kubetune.sdk.local`, :mod:`kubetune.sdk.models` and :mod:`kubetune.sdk.report`.

Every mistake is answered with one ``error:`` line and a ``hint:`` line on stderr and one of these exit codes
(docs/sdk.md), never a traceback:

0 ok · 1 the run failed (and nothing else) · 2 bad usage: a flag, an argument, a file, a spec · 3 not found ·
4 not finished yet (also: ``wait`` gave up) · 5 the cluster or the store unreachable or refusing ·
6 artifact missing or corrupt · 7 an optional extra is missing · 70 a kubetune bug · 130 interrupted.
"""

from __future__ import annotations

import difflib
import importlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from kubetune import __version__
from kubetune.api.errors import (
    EXIT_ARTIFACT,
    EXIT_BROKEN_PIPE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_MISSING_EXTRA,
    EXIT_NOT_FINISHED,
    EXIT_NOT_FOUND,
    EXIT_RUN_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ClusterUnavailable,
    ConfigInvalid,
    KubetuneError,
    LocalRunFailed,
    MissingExtra,
    RunFailed,
    RunNotFound,
)
from kubetune.api.spec import GROUP, SINGULAR, TERMINAL_PHASES, FinetuneRunStatus, Phase

if TYPE_CHECKING:
    from kubetune.api.events import Event
    from kubetune.api.runfile import RunFile
    from kubetune.sdk.client import Client, Run

DEBUG_ENV = "KUBETUNE_DEBUG"  # set to 1: an unexpected exception (exit 70) shows its traceback
RESOURCE = f"{SINGULAR}.{GROUP}"  # what `-o name` prints before the run's name, as kubectl does
STAGING_MODULE = "kubetune.sdk.staging"


class _Console(Console):
    """rich's console, except that a reader gone away is not exit 1 (which says "the run failed")."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


console = _Console()
err = _Console(stderr=True)


def _click_module(name: str) -> Any:
    """click's ``name`` module: typer ≥ 0.2x carries its own copy of click (``typer._click``), older typers use
    click itself. Its exceptions are what a usage error raises."""
    try:
        return importlib.import_module(f"typer._click.{name}")
    except ImportError:
        return importlib.import_module(f"click.{name}")


_click_exceptions = _click_module("exceptions")
_ClickException: type[Exception] = _click_exceptions.ClickException
_NoSuchOption: type[Exception] = _click_exceptions.NoSuchOption
_NoArgsIsHelp: type[Exception] = getattr(_click_exceptions, "NoArgsIsHelpError", type("_Never", (Exception,), {}))
_Abort: tuple[type[BaseException], ...] = (typer.Abort, *(
    [_click_exceptions.Abort] if hasattr(_click_exceptions, "Abort") else []))


# ------------------------------------------------------------------------------------------------ errors
def print_error(message: str, hint: str) -> None:
    """The one shape of every error: an ``error:`` line and a ``hint:`` line (multi-line texts are joined)."""
    err.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)
    err.print(f"[yellow]hint:[/] {escape(' '.join(hint.split()))}", highlight=False, soft_wrap=True)


def _command_path() -> str:
    ctx = _click_module("globals").get_current_context(silent=True)
    return str(ctx.command_path) if ctx is not None else "kubetune"


def _default_hint(code: int) -> str:
    return {
        EXIT_USAGE: f"`{_command_path()} --help` lists the arguments and options",
        EXIT_NOT_FOUND: "`kubetune list -A` lists the runs of every namespace",
        EXIT_NOT_FINISHED: "wait for it: `kubetune wait NAME`",
        EXIT_UNAVAILABLE: "check the connection: KUBECONFIG / --context for the cluster, KUBETUNE_S3_ENDPOINT for S3",
        EXIT_ARTIFACT: "`kubetune artifact verify DIR` checks an artifact against its manifest",
        EXIT_MISSING_EXTRA: "scripts/install.sh sdk,trainer installs what the CLI can use",
        EXIT_RUN_FAILED: "`kubetune describe NAME` shows its conditions and events, `kubetune logs NAME` its log",
    }.get(code, f"`{_command_path()} --help`")


def exit_code_of(exc: KubetuneError) -> int:
    """The exit code of a typed error. Exit 1 says "the run failed" and nothing else: an error that is not a run's
    failure but has no code of its own (the base class: an API server's unexpected answer) is the cluster's."""
    if exc.exit_code == EXIT_RUN_FAILED and not isinstance(exc, RunFailed | LocalRunFailed):
        return EXIT_UNAVAILABLE
    return exc.exit_code


@contextmanager
def errors() -> Iterator[None]:
    """Typed errors → the ``error:`` and ``hint:`` lines and the error's exit code; Ctrl-C → 130."""
    try:
        yield
    except KubetuneError as exc:
        code = exit_code_of(exc)
        print_error(exc.message, exc.hint or _default_hint(code))
        raise typer.Exit(code) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _usage_error(exc: Any) -> None:
    """click's own errors (unknown flag, missing argument, bad value) in the CLI's one shape."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "kubetune"
    hint = f"`{command} --help` lists the arguments and options"
    if isinstance(exc, _NoSuchOption):
        message = str(getattr(exc, "message", exc))
        possibilities = getattr(exc, "possibilities", None)
        if possibilities:
            hint = f"did you mean {' or '.join(possibilities)}? ({hint})"
    else:
        message = str(exc.format_message())
        unknown = re.match(r"No such command '(.+?)'", message)
        if unknown and ctx is not None and hasattr(ctx.command, "list_commands"):
            message = f"no such command {unknown.group(1)!r}"
            near = difflib.get_close_matches(unknown.group(1), ctx.command.list_commands(ctx), n=2)
            hint = f"did you mean {' or '.join(near)}?" if near else f"`{command} --help` lists the commands"
    message = " ".join(message.split())
    print_error(message[:1].lower() + message[1:], hint)


def _reader_gone() -> int:
    """The reader of stdout left (``kubetune list | head``): nothing to report to anyone. stdout is pointed at
    /dev/null so that the interpreter's last flush at exit cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


class CLIGroup(TyperGroup):
    """The root command: click's usage errors answered like every other error, help for a bare ``kubetune``
    (exit 0), and no traceback for anything unexpected (exit 70; KUBETUNE_DEBUG=1 shows it)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, windows_expand_args: bool = True,
             **extra: Any) -> Any:
        try:
            result = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                                  windows_expand_args=windows_expand_args, **extra)
            code = result if isinstance(result, int) else 0
        except _NoArgsIsHelp as exc:  # typer has printed the help already (older typers: only formatted it)
            message = str(getattr(exc, "format_message", str)())
            if message.strip():
                sys.stdout.write(message.rstrip("\n") + "\n")
            code = 0
        except _ClickException as exc:
            _usage_error(exc)
            code = EXIT_USAGE
        except _Abort:
            err.print("[yellow]interrupted[/]")
            code = EXIT_INTERRUPTED
        except BrokenPipeError:
            code = _reader_gone()
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            print_error(f"unexpected {type(exc).__name__}" + (f": {first}" if first else ""),
                        f"this is a kubetune bug: please report it with the command; {DEBUG_ENV}=1 shows the "
                        "traceback")
            code = EXIT_INTERNAL
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(name="kubetune", cls=CLIGroup, no_args_is_help=True, add_completion=True,
                  pretty_exceptions_enable=False,
                  help="Fine-tune CLIP for text-to-image search, locally or on Kubernetes.",
                  context_settings={"help_option_names": ["-h", "--help"]})
artifact_app = typer.Typer(no_args_is_help=True, help="Download and inspect artifacts.")
app.add_typer(artifact_app, name="artifact")
models_app = typer.Typer(help="Backbones to fine-tune; `models stage` copies one into S3.")
app.add_typer(models_app, name="models")
data_app = typer.Typer(no_args_is_help=True, help="Check a data set, or write it as WebDataset shards.")
app.add_typer(data_app, name="data")

KEY_METRICS = ("R@1", "R@5", "R@10", "reciprocal_rank", "ndcg_at_k", "average_precision", "precision_at_k",
               "recall_at_k", "hit_at_k", "dcg_at_k", "mean_rank", "median_rank")
LOWER_IS_BETTER = {"mean_rank", "median_rank"}


class Output(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


class ListOutput(str, Enum):
    """Output of the commands that show runs or models: kubectl's -o values."""

    table = "table"
    wide = "wide"
    name = "name"
    json = "json"
    yaml = "yaml"


NamespaceOpt = Annotated[str | None, typer.Option("--namespace", "-n", envvar="KUBETUNE_NAMESPACE",
                                                  help="Namespace (default: the kubeconfig context's).")]
KubeconfigOpt = Annotated[str | None, typer.Option("--kubeconfig", envvar="KUBECONFIG", show_envvar=False,
                                                   help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, "
                                                        "or the in-cluster service account).")]
ContextOpt = Annotated[str | None, typer.Option("--context", help="kubeconfig context.")]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table (for people), json or yaml (for scripts).")]
ListOutputOpt = Annotated[ListOutput, typer.Option(
    "--output", "-o", help="table, wide (more columns), name (resource/NAME per line), json or yaml.")]
RunFileArg = Annotated[Path, typer.Argument(help="A FinetuneRun YAML file.", exists=True, dir_okay=False)]


# ------------------------------------------------------------------------------------------------ helpers
def dump(data: Any, output: Output | ListOutput) -> None:
    if output.value == "json":
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def metrics_table(metrics: dict[str, dict[str, float]], title: str = "Retrieval, before → after fine-tuning") -> Table:
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    names = [m for m in KEY_METRICS if m in before or m in after]
    names += sorted(k for k in {*before, *after} if k not in names and k not in ("queries", "skipped_queries"))
    for name in names:
        b, a = before.get(name), after.get(name)
        change = ""
        if a is not None and b is not None:
            better = (a < b) if name in LOWER_IS_BETTER else (a > b)
            colour = "green" if better else ("red" if a != b else "dim")
            change = f"[{colour}]{a - b:+.4f}[/]" if abs(a - b) < 100 else f"[{colour}]{a - b:+.1f}[/]"
        table.add_row(name, _fmt(b), _fmt(a), change)
    return table


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, option: str) -> float:
    """Seconds of a kubectl-style duration: ``30s``, ``10m``, ``1h30m``, ``2d``, or a bare number of seconds."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise ConfigInvalid(f"{option} {text!r}: not a duration", "e.g. 30s, 10m, 1h30m or 2d") from None
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigInvalid(f"{option} {text!r}: not a duration", "e.g. 30s, 10m, 1h30m or 2d")
    return seconds


def _ago(timestamp: str | None, now: datetime | None = None) -> str:
    """``5m`` for an RFC 3339 time five minutes ago; ``–`` when there is none."""
    if not timestamp:
        return "–"
    try:
        then = datetime.fromisoformat(str(timestamp).replace("Z", "+00:00"))
    except ValueError:
        return str(timestamp)
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    seconds = max(0, int(((now or datetime.now(timezone.utc)) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


_LOG_PREFIX = re.compile(r"^\S+ \S+ [A-Z]+ [\w.]+: ")


class LocalProgress:
    """A rich progress display driven by the trainer's events (epoch, step, loss, samples/s, ETA)."""

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

        self.console = console
        self.progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}[/] · {task.fields[rate]} samples/s · ETA {task.fields[eta]}"),
            TextColumn("[dim]{task.fields[status]}[/]"),
            console=console, transient=False, refresh_per_second=4)
        self.task = self.progress.add_task("starting", total=None, loss="–", rate="–", eta="–", status="")
        self.done = False

    def __enter__(self) -> LocalProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_log(self, line: str) -> None:
        text = _LOG_PREFIX.sub("", line).strip()
        if text and not self.done and not text.startswith(("epoch ", "Traceback")):
            self.progress.update(self.task, status=text[:40])

    def on_event(self, event: Event) -> None:
        p, t = self.progress, self.task
        if event.type == "started":
            p.update(t, total=event.total_steps, description=f"epoch 1/{event.epochs or '?'}")
        elif event.type == "progress":
            p.update(t, completed=event.step or 0, total=event.total_steps,
                     description=f"epoch {event.epoch}/{event.epochs}",
                     loss=_fmt(event.loss), rate=f"{event.samples_per_second or 0:.1f}",
                     eta=_duration(event.eta_seconds), status="training")
        elif event.type == "metrics":
            losses = ", ".join(f"{k} {getattr(event, k):.4f}" for k in ("train_loss", "val_loss")
                               if getattr(event, k) is not None)
            p.console.print(f"  epoch {event.epoch}: {losses}")
        elif event.type == "evaluation" and event.metrics:
            shown = ", ".join(f"{k} {event.metrics[k]:.3f}" for k in ("R@1", "R@5", "reciprocal_rank")
                              if k in event.metrics)
            p.console.print(f"  evaluation ({event.stage}): {shown}")
        elif event.type == "finished":
            self.done = True
            p.update(t, status="", eta="0:00")
        elif event.type == "failed":
            p.update(t, status=f"[red]failed: {event.reason}[/]")


@contextmanager
def _spinner(text: str) -> Iterator[None]:
    with err.status(text):
        yield


def _client(namespace: str | None, kubeconfig: str | None, context: str | None) -> Client:
    """A client whose kubeconfig is read now, so that an unreadable one is a typed error (exit 5)."""
    import yaml

    from kubetune.sdk.client import Client

    client = Client(namespace=namespace, kubeconfig=kubeconfig, context=context)
    try:
        client.api_client  # noqa: B018 - reads and checks the kubeconfig
    except (ValueError, KeyError, AttributeError, yaml.YAMLError) as exc:  # not YAML, not text, not a kubeconfig
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ClusterUnavailable(f"no usable kubeconfig: {where} is not a kubeconfig ({type(exc).__name__})",
                                 "point KUBECONFIG or --kubeconfig at a kubeconfig file") from None
    return client


def _read_run_file(path: Path) -> RunFile:
    """The run file, validated offline before anything starts or any cluster is asked: readable YAML, a valid
    spec (the one validator, :func:`kubetune.api.runfile.parse_document`), local data that exists."""
    import yaml

    from kubetune.api import runfile

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigInvalid(f"{path}: not a text file", "a run file is a FinetuneRun in YAML or JSON "
                            "(see examples/quickstart.yaml)") from None
    except OSError as exc:
        raise ConfigInvalid(f"cannot read {path}: {exc.strerror or exc}", "check the path") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigInvalid(f"{path}: not valid YAML{where}: {problem}",
                            "check the indentation, quotes and brackets there") from None
    run_file = runfile.parse_document(doc, str(path), path.parent)
    runfile.resolve_local_paths(run_file.spec, run_file.base_dir)
    return run_file


def _names(runs: Sequence[Run]) -> None:
    for r in runs:
        sys.stdout.write(f"{RESOURCE}/{r.name}\n")


# ------------------------------------------------------------------------------------------------ commands
def _version(value: bool) -> None:
    if value:
        console.print(f"kubetune {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                        help="Print the version.")] = False) -> None:
    """Fine-tune CLIP for text-to-image search, locally or on Kubernetes.

    Shell completion: `kubetune --install-completion` (bash, zsh, fish, PowerShell).
    """


@app.command()
def run(file: RunFileArg,
        local: Annotated[bool, typer.Option("--local", help="Train on this machine (no cluster, no S3).")] = False,
        output_dir: Annotated[Path | None, typer.Option(
            "--output-dir", help="Local run directory (default: ./kubetune-runs/NAME; re-use one to resume).")] = None,
        name: Annotated[str | None, typer.Option("--name", help="Run name (default: metadata.name).")] = None,
        gpus: Annotated[int | None, typer.Option("--gpus", help="Override spec.resources.gpus.")] = None,
        namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
        output: OutputOpt = Output.table) -> None:
    """Run a fine-tune: with --local on this machine, else on the cluster (submit, then follow it)."""
    with errors():
        _read_run_file(file)
        if not local:
            _submit(file, name, namespace, kubeconfig, context, gpus, follow=True, output=ListOutput(output.value))
            return
        _check_output_dir(output_dir)
        from kubetune.sdk.local import run_local

        show = err if output != Output.table else console
        started = time.monotonic()
        with LocalProgress(show) as bar:
            result = run_local(file, output_dir=output_dir, name=name, on_event=bar.on_event, on_log=bar.on_log,
                               gpus=gpus)
        metrics = result.metrics()
        if output != Output.table:
            dump({"name": result.name, "outputDir": str(result.output_dir), "artifact": str(result.artifact),
                  "durationSeconds": round(result.duration_seconds, 1), "metrics": metrics}, output)
            return
        console.print(metrics_table(metrics))
        console.print(f"[bold green]done[/] in {_duration(time.monotonic() - started)} · artifact: "
                      f"[bold]{result.artifact}[/]", soft_wrap=True)
        console.print(f"next: [cyan]kubetune encode {result.artifact} --text 'a red circle'[/] · "
                      f"[cyan]kubetune report {result.output_dir}[/]", highlight=False, soft_wrap=True)


def _check_output_dir(output_dir: Path | None) -> None:
    """Fail before the trainer starts when the run directory cannot be made (it is made now, as the run would)."""
    if output_dir is None:
        if not os.access(Path.cwd(), os.W_OK):
            raise ConfigInvalid(f"the current directory ({Path.cwd()}) is not writable: local runs go to "
                                "./kubetune-runs/NAME", "pass --output-dir DIR, or run it from a writable directory")
        return
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigInvalid(f"--output-dir {output_dir}: is a file", "give a directory (new, or a run's to resume it)")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigInvalid(f"--output-dir {output_dir}: cannot create it ({exc.strerror or exc})",
                            "give a directory you can write to") from None


def _submit(file: Path, name: str | None, namespace: str | None, kubeconfig: str | None, context: str | None,
            gpus: int | None, follow: bool, output: ListOutput, validate: bool = True) -> None:
    client = _client(namespace, kubeconfig, context)
    submitted = client.submit(file, name=name, gpus=gpus, validate=validate)
    if output == ListOutput.name and not follow:
        _names([submitted])
        return
    if output in (ListOutput.json, ListOutput.yaml) and not follow:
        dump(submitted.summary(), output)
        return
    err.print(f"created [bold]finetunerun/{submitted.name}[/] in namespace {submitted.namespace}")
    if follow:
        _follow(submitted)


def _follow(run: Run) -> None:
    for line in run.stream_logs():
        console.print(line, highlight=False, markup=False)
    status = run.wait(timeout=60, raise_on_failure=True)
    console.print(metrics_table({"before": status.metrics.before if status.metrics else {},
                                 "after": status.metrics.after if status.metrics else {}}))
    if status.artifact:
        console.print(f"[bold green]done[/] · artifact: {status.artifact.uri}")


@app.command()
def submit(file: RunFileArg,
           name: Annotated[str | None, typer.Option("--name", help="Run name (default: metadata.name).")] = None,
           gpus: Annotated[int | None, typer.Option("--gpus", help="Override spec.resources.gpus.")] = None,
           follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow the logs until it ends.")] = False,
           dry_run: Annotated[bool, typer.Option("--dry-run", help=(
               "Server-side dry run: the API server checks the run as it would create it and stores nothing; "
               "nothing is uploaded."))] = False,
           validate: Annotated[bool, typer.Option("--validate/--no-validate", help=(
               "Check local data before uploading it: every local image decodes, no caption is empty."))] = True,
           namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
           output: ListOutputOpt = ListOutput.table) -> None:
    """Create the FinetuneRun on the cluster; local data files are uploaded to S3 first."""
    with errors():
        _read_run_file(file)
        if dry_run:
            if follow:
                raise ConfigInvalid("--dry-run creates nothing to --follow", "drop one of them")
            obj = _client(namespace, kubeconfig, context).dry_run(file, name=name, gpus=gpus)
            _show_dry_run(obj, output, "created")
            return
        _submit(file, name, namespace, kubeconfig, context, gpus, follow, output, validate)


def _show_dry_run(obj: dict[str, Any], output: Output | ListOutput, verb: str) -> None:
    name = obj.get("metadata", {}).get("name", "?")
    if output.value == "name":
        sys.stdout.write(f"{RESOURCE}/{name}\n")
    elif output.value in ("json", "yaml"):
        dump(obj, output)
    else:
        console.print(f"{RESOURCE}/{name} {verb} (server dry run: nothing stored, nothing uploaded)",
                      highlight=False, soft_wrap=True)


@app.command()
def validate(file: RunFileArg,
             server: Annotated[bool, typer.Option("--server", help=(
                 "Also ask the API server (a dry-run create: its schema, admission, RBAC, a taken name)."))] = False,
             name: Annotated[str | None, typer.Option("--name", help="Run name (default: metadata.name).")] = None,
             namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
             output: OutputOpt = Output.table) -> None:
    """Check a run file offline with the spec model the operator and trainer use (and its local data exist);
    -o yaml prints it with every default filled in."""
    with errors():
        run_file = _read_run_file(file)
        if server:
            _show_dry_run(_client(namespace, kubeconfig, context).dry_run(file, name=name), output, "valid")
            return
        document = run_file.document(name)
        if output != Output.table:
            dump(document, output)
            return
        console.print(f"[green]valid[/]: {file} ({RESOURCE}/{document['metadata']['name']}, model "
                      f"{run_file.spec.model.name}); `--server` also asks the API server", highlight=False,
                      soft_wrap=True)


@app.command()
def explain(field: Annotated[str, typer.Argument(help="A field path, e.g. spec.training.learningRate.")] = "spec",
            recursive: Annotated[bool, typer.Option("--recursive", help="Every field below it, by name.")] = False,
            output: OutputOpt = Output.table) -> None:
    """A FinetuneRun field's type, default, bounds and description (offline; the same schema as the CRD)."""
    with errors():
        from kubetune.sdk import explain as schema

        found = schema.lookup(field)
        if output != Output.table:
            dump({"field": found.path, "required": found.required, "schema": found.schema}, output)
            return
        console.print(schema.render(found, recursive), markup=False, highlight=False, soft_wrap=True)


def _run_row(r: Run, all_namespaces: bool, wide: bool) -> list[str]:
    s = r.summary()
    row = [s["name"], s["phase"] or "–", s["model"], s["progress"] or "–",
           _fmt(s["loss"]) if s["loss"] is not None else "–",
           _fmt(s["after"].get("R@1")) if s["after"] else "–", s["age"]]
    if wide:
        status = r.object.get("status") or {}
        row += [str(status.get("attempts") if status.get("attempts") is not None else "–"), s["artifact"] or "–",
                escape(s["message"] or "")]
    return ([s["namespace"]] if all_namespaces else []) + row


@app.command("list")
def list_cmd(namespace: NamespaceOpt = None, all_namespaces: Annotated[bool, typer.Option(
                 "--all-namespaces", "-A", help="Runs of every namespace.")] = False,
             selector: Annotated[str | None, typer.Option(
                 "--selector", "-l", help="Label selector, e.g. team=search,stage!=test.")] = None,
             kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
             output: ListOutputOpt = ListOutput.table) -> None:
    """List fine-tuning runs."""
    with errors():
        runs = _client(namespace, kubeconfig, context).list_runs(all_namespaces=all_namespaces,
                                                                 label_selector=selector)
        if output == ListOutput.name:
            _names(runs)
            return
        if output in (ListOutput.json, ListOutput.yaml):
            dump([r.summary() for r in runs], output)
            return
        wide = output == ListOutput.wide
        table = Table(box=None, header_style="bold")
        columns = ["NAME", "PHASE", "MODEL", "PROGRESS", "LOSS", "R@1 AFTER", "AGE"]
        for column in (["NAMESPACE"] if all_namespaces else []) + columns + (
                ["ATTEMPTS", "ARTIFACT", "MESSAGE"] if wide else []):
            table.add_column(column, overflow="fold")
        for r in runs:
            table.add_row(*_run_row(r, all_namespaces, wide))
        if not runs:
            err.print("no runs found" + (f" matching {selector}" if selector else ""))
        else:
            console.print(table)


@app.command()
def status(name: str, namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
           output: ListOutputOpt = ListOutput.table) -> None:
    """Show a run's phase, progress, metrics and artifact (-o wide: every condition, the Job and pod too)."""
    with errors():
        r = _client(namespace, kubeconfig, context).get_run(name)
        st = r.status()
        if output == ListOutput.name:
            _names([r])
            return
        if output in (ListOutput.json, ListOutput.yaml):
            dump({"name": r.name, "namespace": r.namespace, "status": st.model_dump(mode="json", by_alias=True,
                                                                                  exclude_none=True)}, output)
            return
        summary = r.summary()
        table = Table(show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        table.add_row("name", f"{r.namespace}/{r.name}")
        table.add_row("phase", str(st.phase or "Pending"))
        table.add_row("model", summary["model"])
        if st.started_from and st.started_from.source:
            table.add_row("weights", escape(st.started_from.source))
        if st.progress:
            pr = st.progress
            table.add_row("progress", f"epoch {pr.epoch}/{pr.epochs} · step {pr.step}/{pr.total_steps} · "
                          f"{pr.samples_per_second or 0:.1f} samples/s · ETA {_duration(pr.eta_seconds)}")
        if st.metrics and (st.metrics.train_loss is not None or st.metrics.val_loss is not None):
            table.add_row("loss", f"train {_fmt(st.metrics.train_loss)} · val {_fmt(st.metrics.val_loss)}")
        if st.message:
            table.add_row("message", escape(st.message))
        wide = output == ListOutput.wide
        for cond in (c for c in st.conditions if wide or c.status == "True"):
            table.add_row(f"condition {escape(cond.type)}",
                          escape(f"{cond.status} {cond.reason or ''} {cond.message or ''}".strip()))
        if wide:
            for label, value in (("attempts", st.attempts), ("retries", st.retries), ("job", st.job_name),
                                 ("pod", st.pod_name), ("checkpoint", st.checkpoint)):
                if value is not None:
                    table.add_row(label, str(value))
        if st.artifact:
            table.add_row("artifact", f"{st.artifact.uri} ({(st.artifact.size or 0) / 1e6:.1f} MB, "
                          f"sha256 {(st.artifact.sha256 or '')[:12]})")
        console.print(table)
        if st.metrics and (st.metrics.before or st.metrics.after):
            console.print(metrics_table({"before": st.metrics.before, "after": st.metrics.after}))


def _spec_lines(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """The spec in a few lines, with the defaults the model fills in."""
    from pydantic import ValidationError

    from kubetune.api.spec import FinetuneRunSpec

    try:
        s = FinetuneRunSpec.model_validate(spec)
    except ValidationError:  # a spec edited past the schema: show it as stored
        return [("spec", json.dumps(spec, default=str)[:500])]
    model = s.model.name + (f"::{s.model.pretrained}" if s.model.pretrained else "") + (
        f" (weights {s.model.weights})" if s.model.weights else "") + (" (custom config)" if s.model.config else "")
    data = " · ".join(f"{f} {getattr(s.data, f)}" for f in ("train", "eval", "query", "index", "reference",
                                                           "zero_shot") if getattr(s.data, f))
    if s.data.val_split:
        data += f" · valSplit {s.data.val_split}"
    t = s.training
    training = (f"{t.epochs} epochs · batch {t.batch_size} · lr {t.learning_rate:g} · {t.optimizer} · {t.scheduler} · "
                f"{t.loss} · precision {t.precision}" + (f" · maxSteps {t.max_steps}" if t.max_steps else "") +
                (" · image tower frozen" if t.lock_image else "") + (" · text tower frozen" if t.lock_text else ""))
    res = s.resources
    resources = f"gpus {res.gpus} · cpu {res.cpu} · memory {res.memory}" + (
        f" · image {res.image}" if res.image else "")
    rp = s.run_policy
    policy = f"backoffLimit {rp.backoff_limit}" + (
        f" · activeDeadlineSeconds {rp.active_deadline_seconds}" if rp.active_deadline_seconds else "") + (
        f" · ttlSecondsAfterFinished {rp.ttl_seconds_after_finished}"
        if rp.ttl_seconds_after_finished is not None else "") + (" · suspended" if rp.suspend else "")
    output = f"{s.output.bucket or '(operator default bucket)'} · prefix {s.output.prefix}" + (
        f" · {s.output.endpoint}" if s.output.endpoint else "")
    return [("model", model), ("data", data), ("training", training), ("resources", resources),
            ("output", output), ("run policy", policy)] + ([("export", "ONNX")] if s.export.onnx else [])


def describe_view(obj: dict[str, Any], events: list[dict[str, Any]], now: datetime | None = None) -> Group:
    """``kubetune describe``'s page for a run object and its Events (as the API serves them). Pure."""
    meta = obj.get("metadata") or {}
    st = FinetuneRunStatus.model_validate(obj.get("status") or {})
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold", no_wrap=True)
    head.add_column(overflow="fold")

    def pairs(values: dict[str, Any] | None) -> str:
        return ", ".join(f"{k}={v}" for k, v in (values or {}).items()) or "<none>"

    created = meta.get("creationTimestamp")
    for label, value in (("Name:", meta.get("name", "?")), ("Namespace:", meta.get("namespace", "?")),
                         ("Labels:", pairs(meta.get("labels"))), ("Annotations:", pairs(meta.get("annotations"))),
                         ("Created:", f"{created or '–'} ({_ago(created, now)} ago)")):
        head.add_row(label, escape(str(value)))
    head.add_row("Spec:", "")
    for label, value in _spec_lines(obj.get("spec") or {}):
        head.add_row(f"  {label.capitalize()}:", escape(value))
    head.add_row("Status:", "")
    rows: list[tuple[str, Any]] = [("Phase", st.phase or "Pending"), ("Message", st.message),
                                   ("Attempts", st.attempts), ("Retries", st.retries), ("Job", st.job_name),
                                   ("Pod", st.pod_name), ("Started", st.start_time), ("Completed", st.completion_time)]
    if st.started_from:
        rows.append(("Started from", " · ".join(filter(None, (st.started_from.ref, st.started_from.source)))))
    if st.progress and st.progress.summary:
        rows.append(("Progress", f"{st.progress.summary} · step {st.progress.step}/{st.progress.total_steps}"
                                 f" · ETA {_duration(st.progress.eta_seconds)}"))
    if st.metrics and (st.metrics.train_loss is not None or st.metrics.val_loss is not None):
        rows.append(("Loss", f"train {_fmt(st.metrics.train_loss)} · val {_fmt(st.metrics.val_loss)}"))
    if st.metrics and st.metrics.after:
        rows.append(("Metrics", " · ".join(f"{k} {_fmt(st.metrics.before.get(k))} → {_fmt(v)}"
                                          for k, v in st.metrics.after.items() if k in KEY_METRICS[:4])))
    if st.artifact:
        rows.append(("Artifact", f"{st.artifact.uri} ({(st.artifact.size or 0) / 1e6:.1f} MB, sha256 "
                                 f"{(st.artifact.sha256 or '')[:12]})"))
    for label, value in rows:
        if value is not None:
            head.add_row(f"  {label}:", escape(str(value)))

    conditions = Table(box=None, header_style="bold", pad_edge=False, title="Conditions:", title_justify="left",
                       title_style="bold")
    for column in ("  TYPE", "STATUS", "REASON", "AGE", "MESSAGE"):
        conditions.add_column(column, overflow="fold")
    for c in st.conditions:
        conditions.add_row(f"  {escape(c.type)}", c.status, escape(c.reason or ""), _ago(c.last_transition_time, now),
                           escape(c.message or ""))
    parts: list[Any] = [head, conditions if st.conditions else "[bold]Conditions:[/]  <none>"]
    if events:
        table = Table(box=None, header_style="bold", pad_edge=False, title="Events:", title_justify="left",
                      title_style="bold")
        for column in ("  TYPE", "REASON", "AGE", "FROM", "MESSAGE"):
            table.add_column(column, overflow="fold")
        for e in events:
            when = e.get("lastTimestamp") or e.get("eventTime") or (e.get("metadata") or {}).get("creationTimestamp")
            count = e.get("count") or 1
            source = (e.get("source") or {}).get("component") or e.get("reportingComponent") or ""
            table.add_row(f"  {escape(e.get('type') or '')}", escape(e.get("reason") or ""),
                          _ago(when, now) + (f" (x{count})" if count > 1 else ""), escape(source),
                          escape(e.get("message") or ""))
        parts.append(table)
    else:
        parts.append("[bold]Events:[/]  <none>")
    return Group(*parts)


@app.command()
def describe(name: str, namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None,
             context: ContextOpt = None, output: OutputOpt = Output.table) -> None:
    """A run in detail: its spec, status, conditions and recent Events (as `kubectl describe ftr NAME`)."""
    with errors():
        r = _client(namespace, kubeconfig, context).get_run(name)
        events = r.kube_events()
        if output != Output.table:
            dump({**r.object, "events": events}, output)
            return
        console.print(describe_view(r.object, events), highlight=False, soft_wrap=True)


@app.command()
def delete(names: Annotated[list[str], typer.Argument(help="Run names.")],
           namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None) -> None:
    """Delete runs: each FinetuneRun with its Jobs (its artifact and checkpoints in S3 stay)."""
    with errors():
        client = _client(namespace, kubeconfig, context)
        missing = []
        for name in names:
            try:
                client.delete_run(name)
            except RunNotFound as exc:
                err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
                missing.append(name)
                continue
            console.print(f"{RESOURCE}/{name} deleted", highlight=False)
        if missing:
            err.print(f"[yellow]hint:[/] {escape(_default_hint(EXIT_NOT_FOUND))}", highlight=False)
            raise typer.Exit(EXIT_NOT_FOUND)


# ---- wait
@dataclass(frozen=True)
class WaitFor:
    """What ``kubetune wait --for`` waits for."""

    kind: Literal["condition", "phase", "delete"]
    value: str = ""
    status: str = "True"

    def __str__(self) -> str:
        if self.kind == "delete":
            return "delete"
        return f"{self.kind}={self.value}" + (f"={self.status}" if self.kind == "condition" and
                                              self.status != "True" else "")


# Condition types that follow the phase: once the run has ended they never change again.
_PHASE_CONDITIONS = frozenset({"Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed", "Cancelled"})
_PHASES = {p.value.lower(): p.value for p in Phase}


def parse_wait_for(text: str) -> WaitFor:
    """``condition=TYPE[=True|False|Unknown]``, ``phase=PHASE`` or ``delete``; :class:`ConfigInvalid` else."""
    hint = "--for=condition=Succeeded, --for=condition=Running=False, --for=phase=Running or --for=delete"
    kind, _, rest = text.strip().partition("=")
    kind = kind.lower()
    if kind == "delete" and not rest:
        return WaitFor("delete")
    if kind == "condition" and rest:
        ctype, _, state = rest.partition("=")
        states = {"true": "True", "false": "False", "unknown": "Unknown", "": "True"}
        if ctype and state.lower() in states:
            return WaitFor("condition", ctype, states[state.lower()])
    if kind == "phase" and rest:
        if rest.lower() in _PHASES:
            return WaitFor("phase", _PHASES[rest.lower()])
        raise ConfigInvalid(f"--for {text!r}: no such phase", "the phases: " + ", ".join(_PHASES.values()))
    raise ConfigInvalid(f"--for {text!r}: not something to wait for", hint)


def wait_outcome(target: WaitFor, status: FinetuneRunStatus) -> Literal["met", "pending", "failed", "never"]:
    """Whether a run in ``status`` meets ``target``, may still meet it, failed, or ended so that it never will.
    Pure. Met comes first: ``--for=condition=Failed`` on a failed run is met, not failed."""
    if target.kind == "phase":
        met = status.phase == target.value or (target.value == Phase.PENDING.value and status.phase is None)
    elif target.kind == "condition":
        cond = next((c for c in status.conditions if c.type.lower() == target.value.lower()), None)
        met = (cond.status if cond is not None else "Unknown") == target.status if target.status != "True" else (
            cond is not None and cond.status == "True")
    else:
        return "pending"
    if met:
        return "met"
    if status.phase not in TERMINAL_PHASES:
        return "pending"
    if target.kind == "condition" and target.value.lower() not in {c.lower() for c in _PHASE_CONDITIONS}:
        return "pending"  # conditions such as CleanedUp still come after the end
    return "never" if status.phase == Phase.SUCCEEDED.value else "failed"


class WaitGaveUp(KubetuneError):
    """``kubetune wait`` timed out, or the run ended so that what it waits for cannot come."""

    exit_code = EXIT_NOT_FINISHED


class NoSuchLog(KubetuneError):
    """``kubetune logs --previous`` of a run that had a single attempt."""

    exit_code = EXIT_NOT_FOUND


def _failure(name: str, st: FinetuneRunStatus) -> RunFailed:
    reason = next((c.reason for c in st.conditions if c.type in ("Failed", "Cancelled") and c.status == "True"), None)
    return RunFailed(name, st.phase, reason, st.message)


@app.command()
def wait(name: str,
         for_: Annotated[str, typer.Option("--for", help=(
             "condition=TYPE[=True|False] (e.g. condition=Succeeded), phase=PHASE (e.g. phase=Running) or "
             "delete."))] = "condition=Succeeded",
         timeout: Annotated[str | None, typer.Option("--timeout", help=(
             "Give up after this long: 30s, 10m, 2h (exit 4); 0 checks once. Default: no limit."))] = None,
         interval: Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between checks.")] = 2.0,
         namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None) -> None:
    """Block until a run meets a condition: exit 0 when it does, 1 when the run failed instead, 4 on --timeout."""
    with errors():
        target = parse_wait_for(for_)
        limit = None if timeout is None else parse_duration(timeout, "--timeout")
        deadline = None if limit is None else time.monotonic() + limit
        client = _client(namespace, kubeconfig, context)
        st: FinetuneRunStatus | None = None
        while True:
            if target.kind == "delete":
                try:
                    client.get_run(name)
                except RunNotFound:
                    console.print(f"{RESOURCE}/{name} deleted", highlight=False)
                    return
            else:
                st = client.get_run(name).status()
                outcome = wait_outcome(target, st)
                if outcome == "met":
                    console.print(f"{RESOURCE}/{name} {target} met", highlight=False)
                    return
                if outcome == "failed":
                    raise _failure(name, st)
                if outcome == "never":
                    raise WaitGaveUp(f"run {name} ended {st.phase}: {target} will not come",
                                     "wait for what it can still reach, e.g. --for=condition=Succeeded")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                phase = f" (phase {st.phase or 'Pending'})" if st is not None else ""
                raise WaitGaveUp(f"timed out after {timeout} waiting for {target} on run {name}{phase}",
                                 f"wait longer (--timeout), or follow it: `kubetune logs {name} -f`")
            time.sleep(interval if remaining is None else max(0.0, min(interval, remaining)))


@app.command()
def logs(name: str, follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow until the run ends.")] = False,
         tail: Annotated[int | None, typer.Option("--tail", min=-1, help="Only the last N lines (-1: all).")] = None,
         since: Annotated[str | None, typer.Option("--since", help="Only lines newer than this: 30s, 10m, 2h.")
                          ] = None,
         previous: Annotated[bool, typer.Option("--previous", "-p", help=(
             "The attempt before the newest (a retry runs in a new pod)."))] = False,
         namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None) -> None:
    """Print a run's trainer log (from its pod, or the status's log tail once the pod is gone)."""
    with errors():
        since_seconds = None if since is None else max(1, math.ceil(parse_duration(since, "--since")))
        tail_lines = None if tail is None or tail < 0 else tail
        if follow and (tail_lines is not None or since_seconds is not None or previous):
            raise ConfigInvalid("--follow reads the log from its start: it does not take --tail, --since or "
                                "--previous", "drop -f to read the end of the log, or follow it with -f alone")
        r = _client(namespace, kubeconfig, context).get_run(name)
        if follow:
            for line in r.stream_logs():
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            return
        lines = r.read_logs(tail_lines=tail_lines, since_seconds=since_seconds, previous=previous)
        if lines is None:
            raise NoSuchLog(f"run {name} has no previous attempt", f"`kubetune logs {name}` shows the current one")
        sys.stdout.write("".join(line + "\n" for line in lines))


@app.command()
def cancel(name: str, delete: Annotated[bool, typer.Option(
               "--delete", help="Delete the FinetuneRun itself (status and history go too; the artifact in S3 stays).")
           ] = False,
           namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None) -> None:
    """Stop a run: its Job is deleted and the run ends Cancelled (checkpoints stay in S3)."""
    with errors():
        r = _client(namespace, kubeconfig, context).get_run(name)
        what = r.cancel(delete=delete)
        console.print(f"finetunerun/{name}: {what}")


@artifact_app.command("pull")
def artifact_pull(name: str, directory: Annotated[Path, typer.Argument(help="Where to put the artifact.")],
                  namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
                  output: OutputOpt = Output.table) -> None:
    """Download a finished run's artifact and verify every file's sha256."""
    with errors():
        if directory.exists() and not directory.is_dir():
            raise ConfigInvalid(f"{directory} is a file", "give a directory (new or empty) for the artifact")
        r = _client(namespace, kubeconfig, context).get_run(name)
        with _spinner(f"downloading the artifact of {name}"):
            path = r.save_artifact(directory)
        if output != Output.table:
            dump({"name": name, "artifact": str(path)}, output)
        else:
            console.print(f"[green]verified[/] artifact in [bold]{path}[/]")


@artifact_app.command("verify")
def artifact_verify(artifact: Path) -> None:
    """Check an artifact directory against its manifest (sha256 and size of every file)."""
    with errors():
        from kubetune.api.errors import ArtifactCorrupt
        from kubetune.sdk.models import verify_artifact

        problems = verify_artifact(artifact)
        if problems:
            raise ArtifactCorrupt(f"{artifact}: " + "; ".join(problems[:5]), "download it again")
        console.print(f"[green]intact[/]: {artifact}")


def _check_save_path(save: Path) -> None:
    """Fail before the model loads when ``--save`` cannot be written."""
    if save.is_dir():
        raise ConfigInvalid(f"--save {save}: is a directory", "give a file name, e.g. --save embeddings.npy")
    parent = save.expanduser().parent
    if not parent.is_dir():
        raise ConfigInvalid(f"--save {save}: the directory {parent} does not exist", "create it first, or save "
                            "elsewhere")


@app.command()
def encode(artifact: Annotated[Path, typer.Argument(help="Artifact directory (or a local run directory).")],
           text: Annotated[list[str] | None, typer.Option("--text", "-t", help="Text to embed (repeatable).")] = None,
           image: Annotated[list[str] | None, typer.Option("--image", "-i", help="Image path/URI (repeatable).")
                            ] = None,
           onnx: Annotated[bool, typer.Option("--onnx", help="Use the ONNX export (onnxruntime).")] = False,
           device: Annotated[str, typer.Option("--device", help="torch device: cpu, cuda or cuda:N.")] = "cpu",
           save: Annotated[Path | None, typer.Option("--save", help="Write the embeddings to a .npy file.")] = None,
           output: OutputOpt = Output.table) -> None:
    """Embed texts (clip-text) or images (clip-vision) with a fine-tuned artifact."""
    with errors():
        if bool(text) == bool(image):
            raise ConfigInvalid("give --text or --image (one kind per call)",
                                "e.g. kubetune encode ARTIFACT --text 'a red circle'")
        if save is not None:
            _check_save_path(save)
        from kubetune.sdk.models import encode as do_encode
        from kubetune.sdk.models import get_model

        kind, items = ("clip-text", text) if text else ("clip-vision", image)
        assert items is not None
        with _spinner(f"loading {kind}"):
            model = get_model(artifact, select_model=kind, is_onnx=onnx, device=device)
            embeddings = do_encode(model, items)
        if save is not None:
            import numpy as np

            try:
                np.save(save.expanduser(), embeddings)
            except OSError as exc:
                raise ConfigInvalid(f"--save {save}: cannot write it ({exc.strerror or exc})",
                                    "check the directory's permissions and free space") from None
        if output != Output.table:
            dump({"model": kind, "shape": list(embeddings.shape), "embeddings": embeddings.round(6).tolist()}, output)
            return
        table = Table(title=f"{kind} embeddings {tuple(embeddings.shape)}, L2-normalised", title_justify="left")
        table.add_column("input")
        table.add_column("first values")
        for item, row in zip(items, embeddings, strict=True):
            table.add_row(escape(item), " ".join(f"{v:+.3f}" for v in row[:6]) + " …")
        console.print(table)
        if save is not None:
            console.print(f"saved to {save}")


def _check_report_input(path: Path) -> None:
    """The report rebuilds the starting model from the run's spec in metadata.json and loads both towers: an
    artifact that fails its manifest or has no readable spec is answered before any of that starts."""
    from pydantic import ValidationError

    from kubetune.api.errors import ArtifactCorrupt
    from kubetune.api.spec import FinetuneRunSpec
    from kubetune.sdk.models import artifact_root, verify_artifact

    root = artifact_root(path)
    problems = verify_artifact(root)
    if problems:
        raise ArtifactCorrupt(f"{root}: " + "; ".join(problems[:5]), "download it again, or re-run the fine-tune")
    try:
        FinetuneRunSpec.model_validate(json.loads((root / "metadata.json").read_text())["spec"])
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        raise ArtifactCorrupt(f"{root / 'metadata.json'}: no readable run spec ({type(exc).__name__})",
                              "the report needs the run's spec: use an artifact written by a kubetune run") from None


def _looks_like_path(target: str) -> bool:
    """A run name is a DNS subdomain: a separator or a leading dot or tilde means a path."""
    return "/" in target or os.sep in target or target.startswith((".", "~"))


@app.command()
def report(target: Annotated[str, typer.Argument(help="A run name (cluster), a local run directory or an artifact.")],
           out: Annotated[Path | None, typer.Option("--out", help="HTML file (default: TARGET/report.html or "
                                                                  "NAME-report.html).")] = None,
           query: Annotated[list[str] | None, typer.Option("--query", "-q", help="Sample query (repeatable; "
                                                                                  "default: from the eval data).")
                            ] = None,
           top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, max=20)] = 5,
           namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None) -> None:
    """Write a self-contained HTML report: top images before/after for sample queries, metrics, curves."""
    with errors():
        from kubetune.api.errors import ArtifactMissing
        from kubetune.sdk.report import write_report

        if out is not None and out.is_dir():
            raise ConfigInvalid(f"--out {out}: is a directory", "give a file name, e.g. --out report.html")
        path = Path(target).expanduser()
        if not path.exists():
            if _looks_like_path(target):
                raise ArtifactMissing(f"{target}: no such run directory or artifact",
                                      "give a local run directory, an artifact directory or a run's name")
            r = _client(namespace, kubeconfig, context).get_run(target)
            import tempfile

            downloads = Path(tempfile.mkdtemp(prefix=f"kubetune-{target}-"))
            with _spinner(f"downloading the artifact of {target}"):
                path = r.save_artifact(downloads / "artifact")
            out = out or Path(f"{target}-report.html")
        _check_report_input(path)
        with _spinner("computing before/after results"):
            written = write_report(path, out=out, queries=query, top_k=top_k)
        console.print(f"report: [bold]{written}[/]")


# ---- models
@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context,
           all_pretrained: Annotated[bool, typer.Option("--all", help="Every open_clip (name, pretrained) pair.")
                                     ] = False,
           output: ListOutputOpt = ListOutput.table) -> None:
    """Backbones to fine-tune (spec.model.name + spec.model.pretrained)."""
    if ctx.invoked_subcommand is not None:
        return
    with errors():
        from kubetune.sdk.models import describe_models

        rows = describe_models(all_pretrained)
        if output == ListOutput.name:
            sys.stdout.write("".join(f"{row['name']}::{row['pretrained']}\n" for row in rows))
            return
        if output in (ListOutput.json, ListOutput.yaml):
            dump(rows, output)
            return
        table = Table(header_style="bold")
        for column in ("name", "pretrained", "dim", "params", "description"):
            table.add_column(column)
        for row in rows:
            table.add_row(row["name"], row["pretrained"] + (" *" if row["default"] else ""),
                          str(row["embed_dim"] or ""), row["params"] or "", row["description"])
        console.print(table)
        console.print("* the tag a model name alone starts from (`pretrained: random`: a random init)",
                      highlight=False, markup=False)


@models_app.command("stage")
def models_stage(ref: Annotated[str, typer.Argument(metavar="NAME::TAG", help=(
                     "A backbone and its pretrained tag, e.g. ViT-B-32::laion2b_s34b_b79k."))],
                 dest: Annotated[str, typer.Argument(metavar="S3_URI", help="Where to put it: s3://BUCKET/PREFIX.")],
                 source: Annotated[Path | None, typer.Option("--from", help=(
                     "Stage this local weights file instead of downloading them."))] = None,
                 output: OutputOpt = Output.table) -> None:
    """Copy a backbone's pretrained weights into S3, so that runs on a cluster without internet can start from
    them (spec.model.weights)."""
    with errors():
        from kubetune.storage import parse_s3_uri

        name, sep, tag = ref.partition("::")
        if not (sep and name.strip() and tag.strip()):
            raise ConfigInvalid(f"{ref!r}: expected NAME::TAG", "e.g. ViT-B-32::laion2b_s34b_b79k "
                                "(`kubetune models` lists them)")
        try:
            parse_s3_uri(dest)
        except ValueError:
            raise ConfigInvalid(f"{dest!r}: not an s3://BUCKET/PREFIX URI", "e.g. s3://models/vit-b-32") from None
        if source is not None and not source.is_file():
            raise ConfigInvalid(f"--from {source}: no such file", "give a local .pt or .safetensors file")
        try:
            staging = importlib.import_module(STAGING_MODULE)
        except ImportError as exc:
            raise MissingExtra("staging a model", "trainer", exc.name or STAGING_MODULE) from None
        with _spinner(f"staging {ref} into {dest}"):
            result = staging.stage_model(ref, dest, source=None if source is None else str(source))
        if output != Output.table:
            dump(result, output)
        else:
            console.print(f"[green]staged[/] {escape(result['ref'])} → {escape(result['file'])} "
                          f"({result['size'] / 1e6:.1f} MB, sha256 {result['sha256'][:12]}); a run's trainer reads "
                          f"it with runDefaults.models.mirror = {escape(dest)}", soft_wrap=True, highlight=False)


# ---- data
DataSourceArg = Annotated[str, typer.Argument(metavar="FILE|URI", help=(
    "A CSV (caption and image columns) or a docarray DocList: a local path, s3:// or http(s)."))]
TextColumnOpt = Annotated[str, typer.Option("--text-column", help="The captions' column (DocList: field).")]
ImageColumnOpt = Annotated[str, typer.Option("--image-column", help="The images' column (DocList: field).")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=1, max=256, help="Images fetched and decoded at once.")]


@contextmanager
def _image_progress(description: str) -> Iterator[Any]:
    """A progress bar on stderr (a terminal's: a log or a pipe gets no bar), driven by ``(done, total)`` calls."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def data_report_table(report: Any) -> Group:
    """A set's summary for people: the counts, then its first broken rows and its warnings."""

    def spread(s: Any) -> str:
        return f"{_num(s.min)} / {_num(s.median)} / {_num(s.max)}" if s is not None else "–"

    def count(n: int, colour: str) -> str:
        return f"[{colour}]{n}[/]" if n else "0"

    table = Table(title=f"{escape(report.source)} (min / median / max)", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    tokens = (f"{spread(report.caption_tokens)} ({count(report.long_captions, 'yellow')} over 77)"
              if report.caption_tokens is not None else "– (not counted: --tokens needs open_clip)")
    sizes = report.image_sizes
    for what, value in (
            ("rows", str(report.rows)), ("images (distinct)", str(report.images)),
            ("captions per image", spread(report.captions_per_image)),
            ("caption length, characters", spread(report.caption_chars)),
            ("caption length, CLIP tokens", tokens),
            ("image size, width×height", " / ".join(f"{w}×{h}" for w, h in (sizes[k] for k in ("min", "median", "max")))
             if sizes else "–"),
            ("missing images", count(report.missing_images, "red")),
            ("unreadable images", count(report.unreadable_images, "red")),
            ("empty captions", count(report.empty_captions, "red")),
            ("duplicate images", count(report.duplicate_images, "yellow")),
            ("broken rows", count(report.broken_rows, "red"))):
        table.add_row(what, value)
    parts: list[Any] = [table]
    if report.problems:
        problems = Table(title=f"first broken rows ({len(report.problems)} of {report.broken_rows})",
                         title_justify="left", header_style="bold")
        problems.add_column("row", justify="right")
        problems.add_column("problem")
        for problem in report.problems:
            problems.add_row(str(problem.row), escape(problem.reason))
        parts.append(problems)
    parts += [f"[yellow]warning:[/] {escape(w)}" for w in report.warnings]
    return Group(*parts)


@data_app.command("validate")
def data_validate(source: DataSourceArg, text_column: TextColumnOpt = "text", image_column: ImageColumnOpt = "image",
                  workers: WorkersOpt = 8,
                  tokens: Annotated[bool, typer.Option("--tokens/--no-tokens", help=(
                      "Count CLIP tokens per caption (needs open_clip; a few seconds to load)."))] = True,
                  output: OutputOpt = Output.table) -> None:
    """Fetch and decode every image of a set and summarise it; exit 2 when a row is broken.

    A row is broken when its image is missing or unreadable (decoded fully: a truncated file is found) or its
    caption is empty; duplicate images (the same bytes under two URIs) and captions over 77 CLIP tokens are
    warnings. -o json prints the summary as one object."""
    with errors():
        from kubetune.sdk import datatools

        with _image_progress("checking images") as progress:
            report = datatools.validate_set(source, text_column=text_column, image_column=image_column,
                                            workers=workers, tokens=tokens, on_progress=progress)
        if output != Output.table:
            dump(report.to_dict(), output)
        else:
            console.print(data_report_table(report), soft_wrap=True)
        if not report.ok:
            raise ConfigInvalid(f"{source}: {report.broken_rows} broken row(s) of {report.rows}, first: "
                                f"{report.first_problems(1)}",
                                "fix or drop them; data.skipBadRows trains without them, `kubetune data shard "
                                "--skip-bad-rows` leaves them out")
        if output == Output.table:
            console.print(f"[green]valid[/]: {report.rows} rows, {report.images} images", highlight=False)


@data_app.command("shard")
def data_shard(source: DataSourceArg,
               dest: Annotated[str, typer.Argument(metavar="DEST", help=(
                   "Where the shards go: s3://BUCKET/PREFIX/ or a local directory."))],
               shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Images per shard.")] = 1000,
               workers: WorkersOpt = 8,
               skip_bad_rows: Annotated[bool, typer.Option("--skip-bad-rows", help=(
                   "Leave broken rows out (counted) instead of failing on the first."))] = False,
               text_column: TextColumnOpt = "text", image_column: ImageColumnOpt = "image",
               output: OutputOpt = Output.table) -> None:
    """Write a set as WebDataset shards that a run streams (data.train: the printed prefix).

    One sample per distinct image with every caption of it, in the order of the rows; the same set gives the same
    bytes. A broken row stops it (named), unless --skip-bad-rows leaves such rows out."""
    with errors():
        from kubetune.sdk import datatools

        with _image_progress("writing shards") as progress:
            result = datatools.write_shards(source, dest, shard_size=shard_size, workers=workers,
                                            skip_bad_rows=skip_bad_rows, text_column=text_column,
                                            image_column=image_column, on_progress=progress)
        if output != Output.table:
            dump({"source": result.source, "dest": result.dest, "shards": len(result.shards),
                  "images": result.images, "pairs": result.pairs, "skippedRows": result.skipped_rows,
                  "problems": [{"row": p.row, "reason": p.reason} for p in result.problems],
                  "data": {"train": result.dest}}, output)
            return
        console.print(f"[green]wrote[/] {len(result.shards)} shard(s), {result.images} images, {result.pairs} pairs "
                      f"to {escape(result.dest)}", highlight=False, soft_wrap=True)
        if result.skipped_rows:
            first = "; ".join(f"row {p.row}: {p.reason}" for p in result.problems[:3])
            console.print(f"[yellow]skipped[/] {result.skipped_rows} broken row(s): {escape(first)}",
                          highlight=False, soft_wrap=True)
        console.print(f"data.train: {escape(result.dest)}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kubetune`` script; returns the exit code."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="kubetune", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
