"""``kubetune``: the command line. Every command is a thin shell over :mod:`kubetune.sdk.client`,
:mod:`kubetune.sdk.local`, :mod:`kubetune.sdk.models` and :mod:`kubetune.sdk.report`.

Exit codes: 0 ok · 1 the run failed · 2 bad usage or config · 3 not found · 4 not finished yet ·
5 cluster or store unreachable · 6 artifact missing or corrupt · 7 an optional extra is missing ·
130 interrupted.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kubetune import __version__
from kubetune.api.errors import EXIT_INTERRUPTED, EXIT_USAGE, KubetuneError

if TYPE_CHECKING:
    from kubetune.api.events import Event
    from kubetune.sdk.client import Run

app = typer.Typer(name="kubetune", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Fine-tune CLIP for text-to-image search, locally or on Kubernetes.",
                  context_settings={"help_option_names": ["-h", "--help"]})
artifact_app = typer.Typer(no_args_is_help=True, help="Download and inspect artifacts.")
app.add_typer(artifact_app, name="artifact")

console = Console()
err = Console(stderr=True)

KEY_METRICS = ("R@1", "R@5", "R@10", "reciprocal_rank", "ndcg_at_k", "average_precision", "precision_at_k",
               "recall_at_k", "hit_at_k", "dcg_at_k", "mean_rank", "median_rank")
LOWER_IS_BETTER = {"mean_rank", "median_rank"}


class Output(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


NamespaceOpt = Annotated[str | None, typer.Option("--namespace", "-n", envvar="KUBETUNE_NAMESPACE",
                                                  help="Namespace (default: the kubeconfig context's).")]
KubeconfigOpt = Annotated[str | None, typer.Option("--kubeconfig", envvar="KUBECONFIG", show_envvar=False,
                                                   help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, "
                                                        "or the in-cluster service account).")]
ContextOpt = Annotated[str | None, typer.Option("--context", help="kubeconfig context.")]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table (for people), json or yaml (for scripts).")]


# ------------------------------------------------------------------------------------------------ helpers
@contextmanager
def errors() -> Iterator[None]:
    """Typed errors → a red message, the hint and the error's exit code; Ctrl-C → 130."""
    try:
        yield
    except KubetuneError as exc:
        err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        if exc.hint:
            err.print(f"[yellow]hint:[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def dump(data: Any, output: Output) -> None:
    if output == Output.json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


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


def _run_summary(run: Run) -> dict[str, Any]:
    return run.summary()


# ------------------------------------------------------------------------------------------------ commands
def _version(value: bool) -> None:
    if value:
        console.print(f"kubetune {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                        help="Print the version.")] = False) -> None:
    """Fine-tune CLIP for text-to-image search, locally or on Kubernetes."""


@app.command()
def run(file: Annotated[Path, typer.Argument(help="A FinetuneRun YAML file.", exists=True, dir_okay=False)],
        local: Annotated[bool, typer.Option("--local", help="Train on this machine (no cluster, no S3).")] = False,
        output_dir: Annotated[Path | None, typer.Option(
            "--output-dir", help="Local run directory (default: ./kubetune-runs/NAME; re-use one to resume).")] = None,
        name: Annotated[str | None, typer.Option("--name", help="Run name (default: metadata.name).")] = None,
        gpus: Annotated[int | None, typer.Option("--gpus", help="Override spec.resources.gpus.")] = None,
        namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
        output: OutputOpt = Output.table) -> None:
    """Run a fine-tune: with --local on this machine, else on the cluster (submit, then follow it)."""
    with errors():
        if not local:
            _submit(file, name, namespace, kubeconfig, context, gpus, follow=True, output=output)
            return
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


def _client(namespace: str | None, kubeconfig: str | None, context: str | None) -> Any:
    from kubetune.sdk.client import Client

    return Client(namespace=namespace, kubeconfig=kubeconfig, context=context)


def _submit(file: Path, name: str | None, namespace: str | None, kubeconfig: str | None, context: str | None,
            gpus: int | None, follow: bool, output: Output) -> None:
    client = _client(namespace, kubeconfig, context)
    submitted = client.submit(file, name=name, gpus=gpus)
    if output != Output.table and not follow:
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
def submit(file: Annotated[Path, typer.Argument(help="A FinetuneRun YAML file.", exists=True, dir_okay=False)],
           name: Annotated[str | None, typer.Option("--name", help="Run name (default: metadata.name).")] = None,
           gpus: Annotated[int | None, typer.Option("--gpus", help="Override spec.resources.gpus.")] = None,
           follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow the logs until it ends.")] = False,
           namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
           output: OutputOpt = Output.table) -> None:
    """Create the FinetuneRun on the cluster; local data files are uploaded to S3 first."""
    with errors():
        _submit(file, name, namespace, kubeconfig, context, gpus, follow, output)


@app.command("list")
def list_cmd(namespace: NamespaceOpt = None, all_namespaces: Annotated[bool, typer.Option(
                 "--all-namespaces", "-A", help="Runs of every namespace.")] = False,
             kubeconfig: KubeconfigOpt = None, context: ContextOpt = None, output: OutputOpt = Output.table) -> None:
    """List fine-tuning runs."""
    with errors():
        runs = _client(namespace, kubeconfig, context).list_runs(all_namespaces=all_namespaces)
        if output != Output.table:
            dump([r.summary() for r in runs], output)
            return
        table = Table(box=None, header_style="bold")
        for column in (["NAMESPACE"] if all_namespaces else []) + ["NAME", "PHASE", "MODEL", "PROGRESS", "LOSS",
                                                                    "R@1 AFTER", "AGE"]:
            table.add_column(column, overflow="fold")
        for r in runs:
            s = r.summary()
            row = [s["name"], s["phase"] or "–", s["model"], s["progress"] or "–",
                   _fmt(s["loss"]) if s["loss"] is not None else "–", _fmt(s["after"].get("R@1")) if s["after"]
                   else "–", s["age"]]
            table.add_row(*([s["namespace"]] if all_namespaces else []), *row)
        if not runs:
            err.print("no runs found")
        else:
            console.print(table)


@app.command()
def status(name: str, namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
           output: OutputOpt = Output.table) -> None:
    """Show a run's phase, progress, metrics and artifact."""
    with errors():
        r = _client(namespace, kubeconfig, context).get_run(name)
        st = r.status()
        if output != Output.table:
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
        if st.progress:
            pr = st.progress
            table.add_row("progress", f"epoch {pr.epoch}/{pr.epochs} · step {pr.step}/{pr.total_steps} · "
                          f"{pr.samples_per_second or 0:.1f} samples/s · ETA {_duration(pr.eta_seconds)}")
        if st.metrics and (st.metrics.train_loss is not None or st.metrics.val_loss is not None):
            table.add_row("loss", f"train {_fmt(st.metrics.train_loss)} · val {_fmt(st.metrics.val_loss)}")
        if st.message:
            table.add_row("message", st.message)
        for cond in (c for c in st.conditions if c.status == "True"):
            table.add_row(f"condition {cond.type}", f"{cond.status} {cond.reason or ''} {cond.message or ''}".strip())
        if st.artifact:
            table.add_row("artifact", f"{st.artifact.uri} ({(st.artifact.size or 0) / 1e6:.1f} MB, "
                          f"sha256 {(st.artifact.sha256 or '')[:12]})")
        console.print(table)
        if st.metrics and (st.metrics.before or st.metrics.after):
            console.print(metrics_table({"before": st.metrics.before, "after": st.metrics.after}))


@app.command()
def logs(name: str, follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow until the run ends.")] = False,
         namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None) -> None:
    """Print a run's trainer log (from its pod, or the status's log tail once the pod is gone)."""
    with errors():
        r = _client(namespace, kubeconfig, context).get_run(name)
        if follow:
            for line in r.stream_logs():
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        else:
            text = r.logs()
            sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")


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


@contextmanager
def _spinner(text: str) -> Iterator[None]:
    with err.status(text):
        yield


@app.command()
def encode(artifact: Annotated[Path, typer.Argument(help="Artifact directory (or a local run directory).")],
           text: Annotated[list[str] | None, typer.Option("--text", "-t", help="Text to embed (repeatable).")] = None,
           image: Annotated[list[str] | None, typer.Option("--image", "-i", help="Image path/URI (repeatable).")
                            ] = None,
           onnx: Annotated[bool, typer.Option("--onnx", help="Use the ONNX export (onnxruntime).")] = False,
           save: Annotated[Path | None, typer.Option("--save", help="Write the embeddings to a .npy file.")] = None,
           output: OutputOpt = Output.table) -> None:
    """Embed texts (clip-text) or images (clip-vision) with a fine-tuned artifact."""
    with errors():
        if bool(text) == bool(image):
            err.print("[red]error:[/] give --text or --image (one kind per call)")
            raise typer.Exit(EXIT_USAGE)
        from kubetune.sdk.models import encode as do_encode
        from kubetune.sdk.models import get_model

        kind, items = ("clip-text", text) if text else ("clip-vision", image)
        assert items is not None
        with _spinner(f"loading {kind}"):
            model = get_model(artifact, select_model=kind, is_onnx=onnx)
            embeddings = do_encode(model, items)
        if save is not None:
            import numpy as np

            np.save(save, embeddings)
        if output != Output.table:
            dump({"model": kind, "shape": list(embeddings.shape), "embeddings": embeddings.round(6).tolist()}, output)
            return
        table = Table(title=f"{kind} embeddings {tuple(embeddings.shape)}, L2-normalised", title_justify="left")
        table.add_column("input")
        table.add_column("first values")
        for item, row in zip(items, embeddings, strict=True):
            table.add_row(item, " ".join(f"{v:+.3f}" for v in row[:6]) + " …")
        console.print(table)
        if save is not None:
            console.print(f"saved to {save}")


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
        from kubetune.sdk.report import write_report

        path = Path(target)
        if not path.exists():
            r = _client(namespace, kubeconfig, context).get_run(target)
            import tempfile

            downloads = Path(tempfile.mkdtemp(prefix=f"kubetune-{target}-"))
            with _spinner(f"downloading the artifact of {target}"):
                path = r.save_artifact(downloads / "artifact")
            out = out or Path(f"{target}-report.html")
        with _spinner("computing before/after results"):
            written = write_report(path, out=out, queries=query, top_k=top_k)
        console.print(f"report: [bold]{written}[/]")


@app.command()
def models(all_pretrained: Annotated[bool, typer.Option("--all", help="Every open_clip (name, pretrained) pair.")
                                     ] = False,
           output: OutputOpt = Output.table) -> None:
    """Backbones to fine-tune (spec.model.name + spec.model.pretrained)."""
    with errors():
        from kubetune.sdk.models import describe_models

        rows = describe_models(all_pretrained)
        if output != Output.table:
            dump(rows, output)
            return
        table = Table(header_style="bold")
        for column in ("name", "pretrained", "dim", "params", "description"):
            table.add_column(column)
        for row in rows:
            table.add_row(row["name"], row["pretrained"], str(row["embed_dim"] or ""), row["params"] or "",
                          row["description"])
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kubetune`` script; returns the exit code."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="kubetune", standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
