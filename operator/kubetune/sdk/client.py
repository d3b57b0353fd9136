"""The SDK's cluster side: create FinetuneRuns, follow them, download their artifacts.

    import kubetune
    from kubetune import EvaluationCallback, WiSEFTCallback

    run = kubetune.fit(model="ViT-B-32", pretrained="laion2b_s34b_b79k", train_data="train.csv",
                       eval_data="eval.csv", epochs=5, learning_rate=1e-6,
                       callbacks=[EvaluationCallback(limit=20), WiSEFTCallback(alpha=0.5)])
    for line in run.stream_logs():          # follows the trainer pod(s) until the run ends
        print(line)
    run.metrics()                           # {"before": {...}, "after": {...}}
    artifact = run.save_artifact("clip-model")   # every file checked against the manifest's sha256

Runs are ``FinetuneRun`` objects created through the Kubernetes API (the operator does the rest), so
``kubectl get ftr`` sees them too. Local data (a CSV with its images, or a docarray ``DocList``) is uploaded
to S3 first, under ``s3://BUCKET/<prefix>/<namespace>/<name>/inputs/<upload-id>/``, and the spec points there.
The upload id (UTC time and a random suffix) is new for each submission, so a second submission under a taken
name never overwrites the first run's data; what a submission uploaded is deleted again when its create fails.

S3 from the SDK's side: endpoint from ``Client(s3_endpoint=...)``, ``$KUBETUNE_S3_ENDPOINT``,
``$AWS_ENDPOINT_URL_S3``/``$AWS_ENDPOINT_URL`` or ``spec.output.endpoint``; bucket from ``spec.output.bucket``,
``$KUBETUNE_S3_BUCKET`` or ``kubetune`` (the operator's default); credentials from ``$AWS_ACCESS_KEY_ID`` /
``$AWS_SECRET_ACCESS_KEY``.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import io
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubetune.api import runfile
from kubetune.api.errors import (
    ArtifactMissing,
    ClusterUnavailable,
    ConfigInvalid,
    KubetuneError,
    RunAlreadyExists,
    RunFailed,
    RunNotFinished,
    RunNotFound,
    StorageUnavailable,
)
from kubetune.api.events import MARKER
from kubetune.api.names import RUN_LABEL, check_run_name, run_label
from kubetune.api.spec import (
    API_VERSION,
    CANCEL_ANNOTATION,
    CANCEL_BY_ANNOTATION,
    GROUP,
    KIND,
    PLURAL,
    TERMINAL_PHASES,
    VERSION,
    FinetuneRunSpec,
    FinetuneRunStatus,
    Phase,
)
from kubetune.sdk import compat, documents
from kubetune.sdk.callbacks import CALLBACKS, Callback

log = logging.getLogger("kubetune.sdk")

DEFAULT_BUCKET = "kubetune"
INPUTS = "inputs"

# Finetuner's CLIP names → (open_clip name, pretrained tag)
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    # OpenAI's weights were trained with QuickGELU: open_clip's -quickgelu configs are their architecture
    "clip-base-en": ("ViT-B-32-quickgelu", "openai"),
    "clip-large-en": ("ViT-L-14-quickgelu", "openai"),
    "clip-base-multi": ("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k"),
}


def _local_user() -> str:
    """Who asks (for the cancel annotation): the local user name, or "unknown"."""
    import getpass

    try:
        return getpass.getuser()[:63] or "unknown"
    except Exception:  # no user name (e.g. a container without a passwd entry)
        return "unknown"


# ------------------------------------------------------------------------------------------------ client
class Client:
    """A connection to one cluster (kubeconfig/context or in-cluster) and, for data and artifacts, one S3."""

    def __init__(self, namespace: str | None = None, kubeconfig: str | os.PathLike[str] | None = None,
                 context: str | None = None, s3_endpoint: str | None = None, s3_bucket: str | None = None,
                 api_client: Any = None) -> None:
        self._kubeconfig = str(kubeconfig) if kubeconfig else None
        self._context = context
        self._api_client = api_client
        self._namespace = namespace
        self.s3_endpoint = s3_endpoint or os.environ.get("KUBETUNE_S3_ENDPOINT") or os.environ.get(
            "AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.s3_bucket = s3_bucket or os.environ.get("KUBETUNE_S3_BUCKET")

    # ---- kubernetes plumbing
    @property
    def api_client(self) -> Any:
        if self._api_client is None:
            try:
                from kubernetes import config
            except ImportError:
                from kubetune.api.errors import MissingExtra

                raise MissingExtra("talking to a cluster", "sdk", "kubernetes") from None
            try:
                if self._kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
                    self._api_client = config.new_client_from_config(config_file=self._kubeconfig,
                                                                     context=self._context)
                else:
                    config.load_incluster_config()
                    from kubernetes.client import ApiClient

                    self._api_client = ApiClient()
            except (config.ConfigException, OSError, TypeError) as exc:
                raise ClusterUnavailable(f"no usable kubeconfig: {exc}",
                                         "set KUBECONFIG or pass --kubeconfig/--context (Client(kubeconfig=...))"
                                         ) from None
        return self._api_client

    @property
    def namespace(self) -> str:
        if self._namespace is None:
            self._namespace = "default"
            try:
                from kubernetes import config

                if os.environ.get("KUBERNETES_SERVICE_HOST") and not self._kubeconfig:
                    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                    if path.is_file():
                        self._namespace = path.read_text().strip() or "default"
                else:
                    contexts, active = config.list_kube_config_contexts(config_file=self._kubeconfig)
                    chosen = next((c for c in contexts if c["name"] == self._context), active) if self._context \
                        else active
                    self._namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
            except Exception:  # no kubeconfig yet: the API call will say so
                pass
        return self._namespace

    def _custom(self) -> Any:
        from kubernetes.client import CustomObjectsApi

        return CustomObjectsApi(self.api_client)

    def _core(self) -> Any:
        from kubernetes.client import CoreV1Api

        return CoreV1Api(self.api_client)

    def _batch(self) -> Any:
        from kubernetes.client import BatchV1Api

        return BatchV1Api(self.api_client)

    def _call(self, what: str, fn: Any, name: str | None = None, namespace: str | None = None) -> Any:
        """Run one API call; map the Kubernetes client's errors to typed kubetune errors."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn()
        except KubetuneError:
            raise
        except ApiException as exc:
            ns = namespace or self.namespace
            if exc.status == 404 and name:
                body = _api_message(exc)
                if "the server could not find the requested resource" in body.lower():
                    raise ClusterUnavailable(f"{what}: the FinetuneRun CRD is not installed in this cluster",
                                             "install it: kubectl apply -f crds/ (or the Helm chart)") from None
                raise RunNotFound(name, ns) from None
            if exc.status == 404:
                raise ClusterUnavailable(f"{what}: the FinetuneRun CRD is not installed in this cluster",
                                         "install it: kubectl apply -f crds/ (or the Helm chart)") from None
            if exc.status == 409 and name:
                raise RunAlreadyExists(name, ns) from None
            if exc.status == 422:
                raise ConfigInvalid(f"{what}: the API server rejected the run: {_api_message(exc)}",
                                    "`kubectl explain finetunerun.spec` lists the fields") from None
            if exc.status in (401, 403):
                raise ClusterUnavailable(f"{what}: not allowed ({exc.status}): {_api_message(exc)}",
                                         "check your kubeconfig user's RBAC for finetuneruns.kubetune.io") from None
            raise KubetuneError(f"{what}: API error {exc.status}: {_api_message(exc)}") from None
        except (HTTPError, OSError) as exc:
            raise ClusterUnavailable(f"{what}: cannot reach the Kubernetes API ({type(exc).__name__})",
                                     "is the cluster up? check KUBECONFIG / --context") from None

    # ---- runs
    def get_run(self, name: str, namespace: str | None = None) -> Run:
        ns = namespace or self.namespace
        obj = self._call(f"get finetunerun {name}", lambda: self._custom().get_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name), name, ns)
        return Run(self, obj)

    def list_runs(self, namespace: str | None = None, all_namespaces: bool = False,
                  label_selector: str | None = None) -> list[Run]:
        kwargs = {"label_selector": label_selector} if label_selector else {}
        if all_namespaces:
            result = self._call("list finetuneruns", lambda: self._custom().list_cluster_custom_object(
                GROUP, VERSION, PLURAL, **kwargs))
        else:
            ns = namespace or self.namespace
            result = self._call("list finetuneruns", lambda: self._custom().list_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, **kwargs))
        runs = [Run(self, item) for item in result.get("items", [])]
        return sorted(runs, key=lambda r: (r.namespace, r.created or "", r.name))

    def delete_run(self, name: str, namespace: str | None = None) -> None:
        """Delete a FinetuneRun: its Jobs go with it; its artifact and checkpoints in S3 stay."""
        ns = namespace or self.namespace
        self._call(f"delete finetunerun {name}", lambda: self._custom().delete_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name), name, ns)

    def dry_run(self, path: str | os.PathLike[str], name: str | None = None, namespace: str | None = None,
                gpus: int | None = None) -> dict[str, Any]:
        """Create a run file's FinetuneRun as a server-side dry run (``dryRun=All``): the API server checks what
        only it can (its CRD schema, admission, RBAC, a taken name, the namespace) and stores nothing. Nothing is
        uploaded, so local data paths stay as written. Returns the object the server would have stored."""
        run = runfile.load(path)
        spec = run.spec
        if gpus is not None:
            spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpus": gpus})})
        ns = namespace or run.namespace or self.namespace
        name = check_run_name(name or run.name or generate_name(spec.model.name))
        body = runfile.with_spec(run, spec).document(name, ns)
        result: dict[str, Any] = self._call(
            f"create finetunerun {name} (dry run)", lambda: self._custom().create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, body, dry_run="All"), name, ns)
        return result

    def create(self, spec: FinetuneRunSpec | dict[str, Any], name: str | None = None,
               namespace: str | None = None, labels: dict[str, str] | None = None,
               annotations: dict[str, str] | None = None, upload: bool = True,
               base_dir: str | os.PathLike[str] = ".", validate: bool = True) -> Run:
        """Create a FinetuneRun from a spec; local data paths are uploaded first (``upload=True``).

        ``validate``: every local data set is checked before anything is uploaded (each local image fetched and
        decoded, no empty caption, its columns there: :func:`check_local_data`); a broken set is
        :class:`ConfigInvalid` naming its first broken rows.

        The uploads go under ``inputs/<upload-id>/``, a prefix of this submission's own: when the name turns
        out to be taken, the run that has it keeps its data. A name taken already is refused before anything is
        uploaded; when the create fails anyway (a run of the same name created meanwhile, or any other error),
        what this submission uploaded is deleted again.
        """
        if not isinstance(spec, FinetuneRunSpec):
            spec = validate_spec(spec)
        ns = namespace or self.namespace
        name = check_run_name(generate_name(spec.model.name) if name is None else name)
        upload_id = None
        if upload and has_local_inputs(spec):
            self._refuse_taken_name(name, ns)
            if validate:
                check_local_data(spec, Path(base_dir))
            upload_id = new_upload_id()
            spec = self.upload_inputs(spec, name, ns, Path(base_dir), upload_id)
        metadata: dict[str, Any] = {"name": name, "namespace": ns}
        if labels:
            metadata["labels"] = labels
        if annotations:
            metadata["annotations"] = annotations
        body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec.dump()}
        try:
            obj = self._call(f"create finetunerun {name}", lambda: self._custom().create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, body), name, ns)
        except Exception:
            if upload_id is not None:
                self._discard_failed_upload(spec, name, ns, upload_id)
            raise
        return Run(self, obj)

    def _refuse_taken_name(self, name: str, namespace: str) -> None:
        """:class:`RunAlreadyExists` when the run exists. An early answer only: a run created between this look
        and the create still meets the create's 409, and its data is safe because every upload has its own
        prefix."""
        try:
            self.get_run(name, namespace)
        except RunNotFound:
            return
        raise RunAlreadyExists(name, namespace)

    def _discard_failed_upload(self, spec: FinetuneRunSpec, name: str, namespace: str, upload_id: str) -> None:
        """Delete a submission's uploads after its create failed; never raises (the caller re-raises the
        create's error).

        A create can fail on the client's side after the API server took it (a connection reset, a timeout), and
        then a run points at these uploads: they are kept when a run of this name refers to them, or when that
        cannot be told.
        """
        prefix = inputs_key(spec.output.prefix, namespace, name, upload_id)
        try:
            store = self.store_for(spec)
            uri = store.uri(prefix)
        except Exception as exc:  # the create's error is what the caller must see
            log.warning("could not delete the uploaded inputs %s (%s)", prefix, exc)
            return
        try:
            existing: dict[str, Any] | None = self.get_run(name, namespace)._obj
        except RunNotFound:
            existing = None
        except Exception as exc:
            log.warning("kept the uploaded inputs %s: cannot tell whether run %s/%s was created (%s)", uri,
                        namespace, name, exc)
            return
        if existing is not None and _refers_to(existing.get("spec"), uri):
            log.warning("run %s/%s was created although its create reported an error; it keeps its inputs %s",
                        namespace, name, uri)
            return
        try:
            store.delete_prefix(prefix)
        except Exception as exc:
            log.warning("could not delete the uploaded inputs %s of a run that was not created (%s); they are "
                        "no run's data, delete them by hand", uri, exc)

    def submit(self, path: str | os.PathLike[str], name: str | None = None, namespace: str | None = None,
               gpus: int | None = None, validate: bool = True) -> Run:
        """Create the FinetuneRun of a run file (the same file ``kubetune run --local`` takes); ``validate``: as
        :meth:`create`."""
        run = runfile.load(path)
        spec = run.spec
        if gpus is not None:
            spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpus": gpus})})
        return self.create(spec, name=name or run.name, namespace=namespace or run.namespace, labels=run.labels,
                           annotations=run.annotations, base_dir=run.base_dir, validate=validate)

    # ---- S3
    def store_for(self, spec: FinetuneRunSpec) -> Any:
        """The bucket store the run's data and artifact go to, as seen from this machine."""
        from kubetune.storage import s3_store

        endpoint = self.s3_endpoint or spec.output.endpoint
        if not endpoint:
            raise ConfigInvalid("no S3 endpoint known on this machine",
                                "set KUBETUNE_S3_ENDPOINT (or spec.output.endpoint), or use s3:// data URIs")
        bucket = spec.output.bucket or self.s3_bucket or DEFAULT_BUCKET
        return s3_store(endpoint, bucket, spec.output.region)

    def upload_inputs(self, spec: FinetuneRunSpec, name: str, namespace: str, base_dir: Path,
                      upload_id: str | None = None) -> FinetuneRunSpec:
        """Upload local data (and starting weights) under ``inputs/<upload_id>/`` (a new id when None) and point
        the spec at the uploaded copies. When an upload fails, what went up before it is deleted again."""
        from kubetune.storage import StoreError, StoreUnavailable

        if not has_local_inputs(spec):
            return spec
        store = self.store_for(spec)
        prefix = inputs_key(spec.output.prefix, namespace, name, upload_id or new_upload_id())
        try:
            try:
                return _upload_local_inputs(store, prefix, spec, base_dir)
            except StoreUnavailable:  # a clean-up would only wait out the same outage again
                log.warning("the partial upload %s is left behind: S3 is unreachable", store.uri(prefix))
                raise
            except Exception:
                try:
                    store.delete_prefix(prefix)
                except Exception as exc:  # the upload's error is what the caller must see
                    log.warning("could not delete the partial upload %s (%s)", store.uri(prefix), exc)
                raise
        except FileNotFoundError as exc:
            raise ConfigInvalid(f"local data: {exc}", "relative paths are relative to the run file") from None
        except StoreUnavailable as exc:
            raise StorageUnavailable(f"uploading the data: {exc}", "is the S3 endpoint reachable?") from None
        except StoreError as exc:
            raise StorageUnavailable(f"uploading the data: {exc}",
                                     "check the bucket exists and the credentials (AWS_ACCESS_KEY_ID...)") from None


def _upload_local_inputs(store: Any, prefix: str, spec: FinetuneRunSpec, base_dir: Path) -> FinetuneRunSpec:
    """Upload the spec's local data sets and weights under ``prefix``; the spec pointing at the copies."""
    from kubetune.storage import join_key

    data = spec.data.model_copy()
    model = spec.model.model_copy()
    uploaded: dict[Path, str] = {}
    for field in _local_data_fields(spec):
        path = runfile.local_path(getattr(spec.data, field), base_dir)
        if path not in uploaded:
            uploaded[path] = upload_dataset(store, join_key(prefix, field), path, spec.data.image_column,
                                            spec.data.format)
        setattr(data, field, uploaded[path])
    if model.weights and runfile.is_local(model.weights):
        path = runfile.local_path(model.weights, base_dir)
        if path.is_dir():
            store.put_dir(join_key(prefix, "weights"), path)
            model.weights = store.uri(join_key(prefix, "weights"))
        else:
            store.put_file(join_key(prefix, "weights", path.name), path)
            model.weights = store.uri(join_key(prefix, "weights", path.name))
    return spec.model_copy(update={"data": data, "model": model})


def check_local_data(spec: FinetuneRunSpec, base_dir: Path) -> None:
    """Check each local data set before it is uploaded (:func:`kubetune.sdk.datatools.check_local_set`): a run
    would fail on a broken row only after the upload and a pod start. Without the trainer extra (the readers and
    Pillow) the sets go up unchecked, with a warning: the trainer checks them anyway."""
    from kubetune.api.errors import MissingExtra
    from kubetune.sdk import datatools

    checked: set[Path] = set()
    for field in _local_data_fields(spec):
        path = runfile.local_path(getattr(spec.data, field), base_dir)
        if path in checked or not path.is_file() or str(spec.data.format) == "webdataset" or path.suffix == ".tar":
            continue
        checked.add(path)
        try:
            datatools.check_local_set(path, field, spec.data)
        except MissingExtra as exc:
            log.warning("local data uploaded unchecked: %s", exc.message)
            return


def _local_data_fields(spec: FinetuneRunSpec) -> list[str]:
    return [f for f in runfile.DATA_FIELDS if getattr(spec.data, f) and runfile.is_local(getattr(spec.data, f))]


def has_local_inputs(spec: FinetuneRunSpec) -> bool:
    """Whether creating a run of ``spec`` uploads anything (local data sets or starting weights)."""
    return bool(_local_data_fields(spec) or (spec.model.weights and runfile.is_local(spec.model.weights)))


def new_upload_id() -> str:
    """One submission's own folder under ``inputs/``: the UTC time (sortable, readable) and a random suffix (two
    submissions in the same second still differ)."""
    return f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(4)}"


def inputs_key(prefix: str, namespace: str, name: str, upload_id: str) -> str:
    """``<prefix>/<namespace>/<name>/inputs/<upload_id>``: where one submission's local inputs go."""
    from kubetune.storage import join_key, run_key

    return join_key(run_key(prefix, namespace, name), INPUTS, upload_id)


def _refers_to(value: Any, uri: str) -> bool:
    """Whether any string in ``value`` (a spec, nested dicts and lists) is a URI below ``uri``."""
    if isinstance(value, str):
        return value.startswith(uri.rstrip("/") + "/")
    if isinstance(value, dict):
        return any(_refers_to(v, uri) for v in value.values())
    if isinstance(value, list):
        return any(_refers_to(v, uri) for v in value)
    return False


def _api_message(exc: Any) -> str:
    try:
        return str(json.loads(exc.body).get("message", exc.reason))[:1000]
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


# ------------------------------------------------------------------------------------------------ data upload
def upload_dataset(store: Any, prefix: str, path: Path, image_column: str = "image", fmt: str = "auto") -> str:
    """Upload one data set (a CSV with the local images it names, or a DocList file); returns its s3:// URI.

    Images named by relative paths keep their place beside the CSV (so the uploaded CSV is unchanged);
    absolute paths are uploaded under ``files/`` and the uploaded CSV is rewritten to point there.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    from kubetune.storage import join_key

    is_csv = fmt == "csv" or (fmt == "auto" and path.suffix.lower() in (".csv", ".tsv"))
    key = join_key(prefix, path.name)
    if not is_csv:
        store.put_file(key, path)
        return str(store.uri(key))
    text = path.read_text(encoding="utf-8-sig")
    first = text.split("\n", 1)[0]
    dialect = csv.excel_tab if "\t" in first and "," not in first else csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    fields = list(reader.fieldnames or [])
    rows = list(reader)
    rewritten = False
    done: set[str] = set()
    for row in rows:
        value = (row.get(image_column) or "").strip()
        if not value or value.startswith(runfile.REMOTE_PREFIXES):
            continue
        local = Path(value.removeprefix("file://")).expanduser()
        absolute = local.is_absolute() or value.startswith("file://")
        source = local if absolute else (path.parent / local)
        if not source.is_file():
            raise FileNotFoundError(f"{path}: image {value} not found ({source})")
        if absolute or ".." in local.parts:
            digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
            rel = f"files/{digest}{source.suffix}"
            row[image_column] = rel
            rewritten = True
        else:
            rel = local.as_posix()
        if rel not in done:
            store.put_file(join_key(prefix, rel), source)
            done.add(rel)
    if rewritten:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, dialect=dialect)
        writer.writeheader()
        writer.writerows(rows)
        store.put_bytes(key, buffer.getvalue().encode())
    else:
        store.put_file(key, path)
    return str(store.uri(key))


def _materialise(data: Any, work: Path, name: str, csv_options: dict[str, Any] | None = None) -> Any:
    """A kubetune DocumentArray becomes a CSV with its images (:func:`documents.write_pairs_csv`), a docarray v2
    DocList a protobuf file the trainer reads; paths and URIs pass through."""
    if data is None or isinstance(data, str | os.PathLike):
        if isinstance(data, str):
            compat.check_data_reference(data, name)
        return None if data is None else str(data)
    if isinstance(data, documents.DocumentArray):
        columns = {k: v for k, v in (csv_options or {}).items() if k in ("text_column", "image_column")}
        return str(documents.write_pairs_csv(data, work / name, name, **columns))
    if type(data).__module__.startswith("docarray") and hasattr(data, "to_bytes"):
        path = work / f"{name}.bin"
        path.write_bytes(data.to_bytes(protocol="protobuf", compress=None))
        return str(path)
    raise ConfigInvalid(f"{name}_data: expected a path, an s3:// or http(s) URI, a DocumentArray or a docarray "
                        f"DocList, got {type(data).__name__}")


# ------------------------------------------------------------------------------------------------ spec helpers
def validate_spec(body: dict[str, Any]) -> FinetuneRunSpec:
    return runfile.parse_document(body, "spec").spec


def generate_name(model: str) -> str:
    base = "".join(c if c.isalnum() else "-" for c in model.lower()).strip("-")[:30].strip("-") or "run"
    return f"{base}-{datetime.now(timezone.utc).strftime('%m%d%H%M')}-{secrets.token_hex(2)}"


def build_spec(model: str = "ViT-B-32", train_data: Any = None, eval_data: Any = None, *,
               pretrained: str | None = None, model_config: dict[str, Any] | None = None,
               weights: str | None = None, query_data: Any = None, index_data: Any = None, val_split: float = 0.0,
               epochs: int = 5, batch_size: int = 64, learning_rate: float = 1e-5, optimizer: str = "adamw",
               weight_decay: float | None = None, scheduler: str | None = None, warmup_steps: int | None = None,
               precision: str | None = None, loss: str = "CLIPLoss", freeze: Sequence[str] = (),
               callbacks: Sequence[Callback] = (), to_onnx: bool = False, gpus: int | None = None,
               device: str | None = None, cpu: str | None = None,
               memory: str | None = None, image: str | None = None, output: dict[str, Any] | None = None,
               max_steps: int | None = None, num_workers: int | None = None, seed: int | None = None,
               csv_options: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The camelCase spec dict for :func:`fit`'s arguments (pure; validated by the caller).

    ``device`` is Finetuner's: 'cpu' → ``resources.gpus`` 0, 'cuda' → ``gpus`` (default 1), 'auto' → ``gpus``.
    """
    if train_data is None:
        raise ConfigInvalid("train_data is required", "a CSV path, an s3:// URI or a DocList")
    if "::" in model:
        model, pretrained = model.split("::", 1)
    elif model in MODEL_ALIASES and model_config is None:
        # with starting weights (Finetuner's model_artifact) the alias names the architecture only
        model, tag = MODEL_ALIASES[model]
        pretrained = pretrained if pretrained is not None or weights else tag
    spec_model: dict[str, Any] = {"name": model}
    if pretrained:
        spec_model["pretrained"] = pretrained
    if model_config:
        spec_model["config"] = model_config
    if weights:
        spec_model["weights"] = weights
    data: dict[str, Any] = {"train": train_data}
    for key, value in (("eval", eval_data), ("query", query_data), ("index", index_data)):
        if value is not None:
            data[key] = value
    if val_split:
        data["valSplit"] = val_split
    for key, value in (csv_options or {}).items():
        data[{"text_column": "textColumn", "image_column": "imageColumn", "skip_bad_rows": "skipBadRows"}.get(
            key, key)] = value
    training: dict[str, Any] = {"epochs": epochs, "batchSize": batch_size, "learningRate": learning_rate,
                                "optimizer": optimizer, "loss": loss}
    for key, value in (("weightDecay", weight_decay), ("scheduler", scheduler), ("warmupSteps", warmup_steps),
                       ("precision", precision), ("maxSteps", max_steps), ("numWorkers", num_workers),
                       ("seed", seed)):
        if value is not None:
            training[key] = value
    for tower in freeze:
        if tower not in ("image", "text"):
            raise ConfigInvalid(f"freeze: expected 'image' and/or 'text', got {tower!r}")
        training["lockImage" if tower == "image" else "lockText"] = True
    spec: dict[str, Any] = {"model": spec_model, "data": data, "training": training,
                            "export": {"onnx": to_onnx}, "resources": {"gpus": compat.resolve_gpus(device, gpus)}}
    for key, value in (("cpu", cpu), ("memory", memory), ("image", image)):
        if value is not None:
            spec["resources"][key] = value
    if output:
        spec["output"] = dict(output)
    for callback in callbacks or ():
        if not isinstance(callback, CALLBACKS):
            raise ConfigInvalid(f"callbacks: {callback!r} is not a kubetune callback",
                                f"use {', '.join(c.__name__ for c in CALLBACKS)} (from kubetune.callback)")
        callback.apply(spec)
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(spec.get(section), dict):
            spec[section].update(values)
        else:
            spec[section] = values
    return spec


# ------------------------------------------------------------------------------------------------ Run
class Run:
    """A FinetuneRun seen from the SDK; ``status()`` and friends read it afresh from the API server."""

    def __init__(self, client: Client | None, obj: dict[str, Any]) -> None:
        self._client = client
        self._obj = obj

    @property
    def client(self) -> Client:
        """The cluster connection (a local run, :class:`kubetune.sdk.local.LocalRun`, has none)."""
        if self._client is None:
            raise KubetuneError(f"run {self.name} runs on this machine: it has no cluster client")
        return self._client

    def __repr__(self) -> str:
        return f"Run({self.namespace}/{self.name}, phase={self.phase})"

    @property
    def name(self) -> str:
        return str(self._obj["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self._obj["metadata"].get("namespace") or self.client.namespace)

    @property
    def created(self) -> str | None:
        return self._obj["metadata"].get("creationTimestamp")

    @property
    def spec(self) -> FinetuneRunSpec:
        return FinetuneRunSpec.model_validate(self._obj.get("spec") or {})

    @property
    def phase(self) -> str | None:
        return (self._obj.get("status") or {}).get("phase")

    def refresh(self) -> Run:
        self._obj = self.client.get_run(self.name, self.namespace)._obj
        return self

    def status(self) -> compat.RunStatus:
        """The current status: its fields as attributes (``phase``, ``conditions``, ``progress``, ``metrics``,
        ``log_tail``, ``artifact``...) and, read as a mapping, Finetuner's ``{'status': 'CREATED'|'STARTED'|
        'FINISHED'|'FAILED'|'CANCELLED', 'details': ...}``."""
        self.refresh()
        return compat.RunStatus.model_validate(self._obj.get("status") or {})

    def metrics(self) -> dict[str, dict[str, float]]:
        """``{"before": {...}, "after": {...}}`` retrieval metrics (empty until evaluated), each under kubetune's
        names (``R@5``, ``ndcg_at_k``...) and Finetuner's (``clip-text-to-clip-vision_precision_at_k``...), both
        as the trainer reported them."""
        st = self.status()
        return {"before": dict(st.metrics.before) if st.metrics else {},
                "after": dict(st.metrics.after) if st.metrics else {}}

    @property
    def artifact_id(self) -> str | None:
        """Finetuner's ``run.artifact_id``: here the artifact's URI (None until it is published), which
        ``fit(model_artifact=...)`` takes to continue from it."""
        artifact = self.status().artifact
        return artifact.uri if artifact else None

    def display_metrics(self) -> None:
        """Finetuner's ``run.display_metrics()``: the before/after retrieval metrics as a table on stdout."""
        from rich.console import Console

        from kubetune.sdk.cli import metrics_table

        Console().print(metrics_table(self.metrics()))

    def example_results(self, *args: Any, **kwargs: Any) -> None:
        """Finetuner's ``run.example_results()`` / ``display_examples()``: refused, with what to use instead."""
        raise ConfigInvalid("run.example_results() and run.display_examples() are Finetuner's",
                            "kubetune draws sample queries' top images before and after in an HTML page: "
                            "kubetune.write_report(run.save_artifact('model'), 'report.html'), or `kubetune report "
                            "NAME`")

    display_examples = example_results

    # ---- logs
    def _pods(self) -> list[Any]:
        core = self.client._core()
        selector = f"{RUN_LABEL}={run_label(self.name)}"
        pods = self.client._call("list pods", lambda: core.list_namespaced_pod(
            self.namespace, label_selector=selector)).items
        return sorted(pods, key=lambda p: (p.metadata.creation_timestamp or datetime.min.replace(tzinfo=timezone.utc),
                                           p.metadata.name))

    def _pod_log(self, pod: str, follow: bool = False) -> Any:
        from kubernetes.client.exceptions import ApiException

        core = self.client._core()
        try:
            if follow:
                return core.read_namespaced_pod_log(pod, self.namespace, follow=True, _preload_content=False)
            return core.read_namespaced_pod_log(pod, self.namespace)
        except ApiException as exc:
            if exc.status in (400, 404):  # not started yet, or gone
                return None
            raise

    def logs(self, include_events: bool = False) -> str:
        """The trainer's log: from its newest pod, or the status's log tail once the pods are gone."""
        pods = self._pods()
        text = None
        for pod in reversed(pods):
            text = self._pod_log(pod.metadata.name)
            if text is not None:
                break
        if text is None:
            text = "\n".join(self.status().log_tail)
        lines = text.splitlines()
        if not include_events:
            lines = [line for line in lines if not line.startswith(MARKER)]
        return "\n".join(lines)

    def stream_logs(self, poll: float = 2.0, timeout: float | None = None, include_events: bool = False,
                    interval: float | None = None) -> Iterator[str]:
        """Yield log lines as they come, across retries (one pod per attempt), until the run ends.
        ``interval`` is Finetuner's name for ``poll``."""
        poll = poll if interval is None else interval
        deadline = None if timeout is None else time.monotonic() + timeout
        finished: set[str] = set()  # pods whose log has been read to the end
        yielded: dict[str, int] = {}  # pod → lines already yielded (a re-opened stream starts over)
        while deadline is None or time.monotonic() < deadline:
            status = self.status()
            pending = [p for p in self._pods() if p.metadata.name not in finished]
            if pending:
                name = pending[0].metadata.name
                response = self._pod_log(name, follow=True)
                if response is not None:
                    count = 0
                    try:
                        for line in _iter_lines(response):
                            count += 1
                            if count > yielded.get(name, 0):
                                yielded[name] = count
                                if include_events or not line.startswith(MARKER):
                                    yield line
                    finally:
                        response.release_conn()
                    if self._pod_done(name):
                        finished.add(name)
                    else:  # the stream ended early (container just starting, API server hiccup): re-open
                        time.sleep(min(poll, 0.5))
                    continue
                if self._pod_done(name):
                    finished.add(name)
            ended = status.phase in TERMINAL_PHASES
            if ended and not pending:
                if not yielded:  # the pods went before we could read them: the status keeps a tail
                    for line in status.log_tail:
                        if include_events or not line.startswith(MARKER):
                            yield line
                return
            if ended and pending and all(self._pod_done(p.metadata.name) for p in pending):
                finished.update(p.metadata.name for p in pending if self._pod_log(p.metadata.name) is None)
            time.sleep(poll)

    def _pod_done(self, name: str) -> bool:
        """Whether the pod's container has terminated (or the pod is gone): its log is complete."""
        from kubernetes.client.exceptions import ApiException

        try:
            pod = self.client._core().read_namespaced_pod(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        if pod.status.phase in ("Succeeded", "Failed") or pod.metadata.deletion_timestamp:
            return True
        statuses = pod.status.container_statuses or []
        return bool(statuses) and all(c.state.terminated is not None for c in statuses)

    # ---- lifecycle
    def wait(self, timeout: float | None = None, poll: float = 2.0, raise_on_failure: bool = True
             ) -> FinetuneRunStatus:
        """Block until the run ends; raises :class:`RunFailed` when it failed or was cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status()
            if st.phase in TERMINAL_PHASES:
                if raise_on_failure and st.phase != Phase.SUCCEEDED.value:
                    raise self._failure(st)
                return st
            if deadline is not None and time.monotonic() >= deadline:
                raise RunNotFinished(self.name, st.phase)
            time.sleep(poll)

    def _failure(self, st: FinetuneRunStatus) -> RunFailed:
        reason = next((c.reason for c in st.conditions if c.type in ("Failed", "Cancelled") and c.status == "True"),
                      None)
        return RunFailed(self.name, st.phase, reason, st.message)

    def cancel(self, delete: bool = False) -> str:
        """Stop the run. Returns what was done.

        The run is annotated ``kubetune.io/cancel-requested`` (the UTC time) and
        ``kubetune.io/cancel-requested-by`` (the local user); the operator deletes its Job (the checkpoints stay
        in S3), never retries or re-launches it, and sets ``phase: Cancelled``, which :meth:`wait` reports
        (:class:`RunFailed`). With ``delete=True`` the FinetuneRun itself is deleted (its Jobs go
        with it; the artifact and checkpoints in S3 stay).
        """
        custom = self.client._custom()
        if delete:
            self.client._call(f"delete finetunerun {self.name}", lambda: custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name), self.name, self.namespace)
            return "deleted"
        st = self.status()
        if st.phase in TERMINAL_PHASES:
            return f"already {st.phase}"
        patch = {"metadata": {"annotations": {
            CANCEL_ANNOTATION: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            CANCEL_BY_ANNOTATION: _local_user()}}}
        self._obj = self.client._call(f"cancel finetunerun {self.name}", lambda: custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.name, patch), self.name, self.namespace)
        return "cancelled (the operator deletes its Job and ends it Cancelled; checkpoints are kept)"

    @property
    def cancel_requested(self) -> bool:
        return CANCEL_ANNOTATION in (self._obj["metadata"].get("annotations") or {})

    # ---- what `kubectl describe` and `kubectl logs` show
    @property
    def object(self) -> dict[str, Any]:
        """A copy of the FinetuneRun as last read (metadata, spec, status), camelCase as the API serves it."""
        copied: dict[str, Any] = json.loads(json.dumps(self._obj, default=str))
        return copied

    def kube_events(self) -> list[dict[str, Any]]:
        """The run's Kubernetes Events (what ``kubectl describe`` lists), oldest first, as the API serves them
        (camelCase dicts)."""
        core = self.client._core()
        selector = f"involvedObject.kind={KIND},involvedObject.name={self.name}"
        uid = self._obj["metadata"].get("uid")
        if uid:  # a deleted run's Events must not show under a new run of the same name
            selector += f",involvedObject.uid={uid}"
        items = self.client._call("list events", lambda: core.list_namespaced_event(
            self.namespace, field_selector=selector)).items
        events: list[dict[str, Any]] = [self.client.api_client.sanitize_for_serialization(e) for e in items]
        return sorted(events, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime")
                                                or (e.get("metadata") or {}).get("creationTimestamp") or ""))

    def read_logs(self, tail_lines: int | None = None, since_seconds: int | None = None, previous: bool = False,
                  include_events: bool = False) -> list[str] | None:
        """The trainer's log lines as ``kubectl logs`` selects them: the last ``tail_lines``, those of the last
        ``since_seconds``; ``previous``: the attempt before the newest. Trainer pods never restart in place
        (``restartPolicy: Never``, a retry is a new pod), so ``previous`` reads the container's previous instance
        when the API has one and the pod of the attempt before otherwise. None when there is no such log
        (``previous`` with a single attempt). Once the pods are gone the status's log tail is all there is
        (``since_seconds`` cannot apply to it)."""
        pods = self._pods()
        if previous:
            if not pods:
                return None
            lines = self._pod_log_lines(pods[-1].metadata.name, tail_lines, since_seconds, True, include_events)
            if lines is None and len(pods) > 1:
                lines = self._pod_log_lines(pods[-2].metadata.name, tail_lines, since_seconds, False, include_events)
            return lines
        for pod in reversed(pods):
            lines = self._pod_log_lines(pod.metadata.name, tail_lines, since_seconds, False, include_events)
            if lines is not None:
                return lines
        kept = [line for line in self.status().log_tail if include_events or not line.startswith(MARKER)]
        return kept[len(kept) - tail_lines:] if tail_lines is not None and tail_lines < len(kept) else kept

    def _pod_log_lines(self, pod: str, tail_lines: int | None, since_seconds: int | None, previous: bool,
                       include_events: bool) -> list[str] | None:
        """One pod's log lines; None when it has none (not started, gone, no previous container)."""
        from kubernetes.client.exceptions import ApiException

        if tail_lines is not None and tail_lines <= 0:
            return []
        core = self.client._core()
        request = tail_lines
        while True:
            kwargs: dict[str, Any] = {"previous": previous}
            if request is not None:
                kwargs["tail_lines"] = request
            if since_seconds is not None:
                kwargs["since_seconds"] = since_seconds

            def read(kwargs: dict[str, Any] = kwargs) -> str | None:
                try:
                    return str(core.read_namespaced_pod_log(pod, self.namespace, **kwargs))
                except ApiException as exc:
                    if exc.status in (400, 404):
                        return None
                    raise

            text = self.client._call(f"read the log of pod {pod}", read)
            if text is None:
                return None
            raw = text.splitlines()
            lines = raw if include_events else [line for line in raw if not line.startswith(MARKER)]
            # the API counts the event lines in tail_lines too: ask for more until enough human lines came
            if request is None or tail_lines is None or len(lines) >= tail_lines or len(raw) < request:
                return lines[len(lines) - tail_lines:] if tail_lines is not None and tail_lines < len(lines) \
                    else lines
            request *= 4

    # ---- artifact
    def save_artifact(self, directory: str | os.PathLike[str] = "clip-model") -> Path:
        """Download the artifact into ``directory``, verifying each file's sha256 against the manifest (and
        the manifest's against the status). Returns the directory."""
        st = self.status()
        if st.phase != Phase.SUCCEEDED.value:
            if st.phase in TERMINAL_PHASES:
                raise self._failure(st)
            if self.cancel_requested:
                raise RunFailed(self.name, Phase.CANCELLED.value, "CancelRequested", "it was cancelled")
            raise RunNotFinished(self.name, st.phase)
        if st.artifact is None or not st.artifact.uri:
            raise ArtifactMissing(f"run {self.name} succeeded but its status names no artifact",
                                  "check the operator's log; `kubectl describe ftr " + self.name + "`")
        from kubetune.storage import LocalStore, Store, download_artifact, parse_s3_uri, s3_store

        uri = st.artifact.uri
        if uri.startswith("s3://"):
            spec = self.spec
            bucket, key = parse_s3_uri(uri)
            endpoint = self.client.s3_endpoint or spec.output.endpoint
            if not endpoint:
                raise ConfigInvalid("no S3 endpoint known on this machine to download the artifact from",
                                    "set KUBETUNE_S3_ENDPOINT (or Client(s3_endpoint=...))")
            store: Store = s3_store(endpoint, bucket, spec.output.region).child(key)
        else:
            store = LocalStore(uri.removeprefix("file://"))
        return download_artifact(store, Path(directory), st.artifact.sha256, uri)

    def summary(self) -> dict[str, Any]:
        st = FinetuneRunStatus.model_validate(self._obj.get("status") or {})
        spec = self._obj.get("spec") or {}
        model = spec.get("model") or {}
        created = self.created
        age = "–"
        if created:
            seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(created.replace("Z", "+00:00"))
                       ).total_seconds()
            age = _age(seconds)
        return {
            "name": self.name, "namespace": self.namespace, "phase": st.phase,
            "model": st.started_from.ref if st.started_from else (
                model.get("name", "?") + (f"::{model['pretrained']}" if model.get("pretrained") else "")),
            "progress": st.progress.summary if st.progress else None,
            "loss": st.metrics.train_loss if st.metrics else None,
            "before": dict(st.metrics.before) if st.metrics else {},
            "after": dict(st.metrics.after) if st.metrics else {},
            "artifact": st.artifact.uri if st.artifact else None, "created": created, "age": age,
            "message": st.message,
        }


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _iter_lines(response: Any) -> Iterator[str]:
    buffer = b""
    for chunk in response.stream(4096, decode_content=False):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace").rstrip("\r")
    if buffer:
        yield buffer.decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------------ module API
_default: Client | None = None


def configure(**kwargs: Any) -> Client:
    """Set the default client of the module-level functions (``namespace``, ``kubeconfig``, ``context``,
    ``s3_endpoint``, ``s3_bucket``)."""
    global _default
    _default = Client(**kwargs)
    return _default


def _client(client: Client | None = None, namespace: str | None = None) -> Client:
    global _default
    if client is not None:
        return client
    if _default is None:
        _default = Client()
    return _default


def fit(model: str = "ViT-B-32", train_data: Any = None, eval_data: Any = None, *, run_name: str | None = None,
        namespace: str | None = None, query_data: Any = None, index_data: Any = None,
        callbacks: Sequence[Callback] | None = (), wait: bool = False, client: Client | None = None,
        local: bool = False, output_dir: str | os.PathLike[str] | None = None, validate: bool = True,
        **options: Any) -> Run:
    """Start a fine-tuning run on the cluster; returns its :class:`Run` (``wait=True``: after it ended).

    ``validate``: local data sets are checked before they are uploaded (:meth:`Client.create`; False skips it).
    ``local=True``: the same run on this machine instead (no cluster, no S3; ``output_dir``, default
    ``kubetune-runs/NAME``, holds its data, log, checkpoints and artifact); the :class:`Run` it returns has the
    same verbs.

    ``model``: an open_clip name (``ViT-B-32``), ``name::pretrained`` (``ViT-B-32::laion2b_s34b_b79k``) or
    one of Finetuner's CLIP names (``clip-base-en``, ``clip-large-en``, ``clip-base-multi``).
    ``train_data``/``eval_data``/``query_data``/``index_data``: a CSV path (text, image columns), an ``s3://``
    or http(s) URI, a kubetune ``DocumentArray`` or a docarray ``DocList``; local ones are uploaded to S3 first.
    Other options (see :func:`build_spec`): ``pretrained``, ``model_config``, ``weights``, ``val_split``,
    ``epochs``, ``batch_size``, ``learning_rate``, ``optimizer``, ``weight_decay``, ``scheduler``,
    ``warmup_steps``, ``precision``, ``loss`` ('CLIPLoss' | 'SigLIPLoss'), ``freeze`` (['image'|'text']),
    ``to_onnx``, ``device`` ('cuda' | 'cpu' | 'auto'), ``gpus``, ``cpu``, ``memory``, ``image``, ``output``
    (spec.output dict), ``max_steps``, ``num_workers``, ``seed``, ``csv_options``, ``overrides`` (spec sections
    merged last). Finetuner's other arguments are mapped or refused by :func:`compat.translate_fit_options`.
    """
    options, annotations = compat.translate_fit_options(options, _FIT_OPTIONS)
    callbacks = list(callbacks or ())
    for cb in callbacks:  # EvaluationCallback(query_data=..., index_data=...) as in Finetuner
        query_data = query_data if query_data is not None else getattr(cb, "query_data", None)
        index_data = index_data if index_data is not None else getattr(cb, "index_data", None)
    query_data, index_data = documents.labelled_pairs(query_data, index_data)
    if local:
        return _fit_local(model, {"train": train_data, "eval": eval_data, "query": query_data, "index": index_data},
                          callbacks, options, run_name, output_dir, wait)
    c = _client(client)
    with tempfile.TemporaryDirectory(prefix="kubetune-fit-") as work:
        spec = _fit_spec(model, {"train": train_data, "eval": eval_data, "query": query_data, "index": index_data},
                         callbacks, options, Path(work))
        run = c.create(spec, name=run_name, namespace=namespace, annotations=annotations or None, validate=validate)
    if wait:
        run.wait()
    return run


def _fit_spec(model: str, data: dict[str, Any], callbacks: Sequence[Callback], options: dict[str, Any],
              work: Path) -> FinetuneRunSpec:
    """The validated spec of a :func:`fit` call; in-memory data sets are written to files under ``work``."""
    written: dict[int, Any] = {}  # one file per data object: the same object twice is uploaded once

    def materialise(value: Any, set_name: str) -> Any:
        if value is None or isinstance(value, str | os.PathLike):
            return _materialise(value, work, set_name)
        if id(value) not in written:
            written[id(value)] = _materialise(value, work, set_name, options.get("csv_options"))
        return written[id(value)]

    sets = {k: materialise(v, k) for k, v in data.items()}
    body = build_spec(model, sets["train"], sets["eval"], query_data=sets["query"], index_data=sets["index"],
                      callbacks=callbacks, **options)
    return validate_spec(body)


def _fit_local(model: str, data: dict[str, Any], callbacks: Sequence[Callback], options: dict[str, Any],
               run_name: str | None, output_dir: str | os.PathLike[str] | None, wait: bool) -> Run:
    """:func:`fit` on this machine: the run directory gets the data files and a run file, then local mode."""
    import yaml

    from kubetune.sdk import local

    name = check_run_name(run_name or generate_name(model))
    out = (Path(output_dir) if output_dir is not None else local.pick_output_dir(name)).resolve()
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    spec = runfile.resolve_local_paths(_fit_spec(model, data, callbacks, options, inputs), Path.cwd())
    run_file = inputs / "run.yaml"
    run_file.write_text(yaml.safe_dump({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name},
                                        "spec": spec.dump()}, sort_keys=False))
    run = local.start_local(run_file, output_dir=out, name=name)
    if wait:
        run.wait()
    return run


_FIT_OPTIONS = frozenset(inspect.signature(build_spec).parameters) - {
    "model", "train_data", "eval_data", "query_data", "index_data", "callbacks"}


def submit(path: str | os.PathLike[str], name: str | None = None, namespace: str | None = None,
           client: Client | None = None, validate: bool = True) -> Run:
    """Create the FinetuneRun of a run file; local data is checked (``validate``), then uploaded."""
    return _client(client).submit(path, name=name, namespace=namespace, validate=validate)


def get_run(name: str, namespace: str | None = None, client: Client | None = None) -> Run:
    """Reconnect to a run by name (raises :class:`RunNotFound`)."""
    return _client(client).get_run(name, namespace)


def list_runs(namespace: str | None = None, all_namespaces: bool = False, client: Client | None = None) -> list[Run]:
    return _client(client).list_runs(namespace, all_namespaces)


def delete_run(name: str, namespace: str | None = None, client: Client | None = None) -> None:
    """Finetuner's ``delete_run``: delete the FinetuneRun (its Jobs go with it; its artifact stays in S3)."""
    _client(client).delete_run(name, namespace)


def login(*args: Any, **kwargs: Any) -> None:
    """Finetuner's ``login``/``notebook_login``: kubetune needs none. It talks to the cluster of your kubeconfig
    (``configure(namespace=, kubeconfig=, context=)`` picks another), so a Finetuner script's first line runs."""
    log.info("kubetune needs no login: it uses the cluster of your kubeconfig (kubetune.configure picks another)")


notebook_login = login
