"""No traceback for any user error: every command, driven with bad paths, files, URLs, artifacts, flags and
kubeconfigs, answers with an ``error:`` line, a ``hint:`` line and a documented exit code other than 1 (which says
that a run failed). The cluster is never reached: KUBECONFIG names a missing or broken file, or a server on
127.0.0.1:1, which refuses at once. The artifacts are real: a tiny CLIP written by the trainer's own export,
then broken the ways a download or a disk breaks them."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubetune.api import errors
from kubetune.api.errors import EXIT_INTERNAL
from kubetune.sdk.cli import app
from typer.testing import CliRunner

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
EVAL_IMAGE = ROOT / "examples" / "data" / "images" / "eval-00000.png"
USER_ERROR_CODES = {errors.EXIT_USAGE, errors.EXIT_NOT_FOUND, errors.EXIT_UNAVAILABLE, errors.EXIT_ARTIFACT,
                    errors.EXIT_MISSING_EXTRA}
# ~0.2M parameters besides the token embedding (tests/unit/trainer/kt_trainer_helpers.py's TINY_CONFIG)
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

runner = CliRunner()


# ------------------------------------------------------------------------------------------------ materials
def write_tiny_artifact(root: Path) -> Path:
    """A real artifact (both towers, tokenizer and transform config, manifest) of an untrained tiny CLIP."""
    import open_clip
    import torch
    from kubetune_trainer import export
    from open_clip.transform import PreprocessCfg

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CONFIG).eval()
    export.write_artifact(root, model, "kt-tiny", TINY_CONFIG, dataclasses.asdict(PreprocessCfg(size=32)),
                          metrics={}, metadata={})
    return root


def _broken(source: Path, target: Path, damage: Callable[[Path], None]) -> Path:
    shutil.copytree(source, target)
    damage(target)
    return target


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@dataclasses.dataclass(repr=False)
class Materials:
    root: Path
    artifact: Path  # intact (its metadata has no run spec, so `report` refuses it)
    artifacts: dict[str, Path]  # broken artifacts by kind
    files: dict[str, Path]  # bad run files by kind
    images: dict[str, str]  # bad --image values by kind
    kubeconfigs: dict[str, Path]

    def __repr__(self) -> str:  # hypothesis prints it with each failing example
        return f"Materials({self.root})"


@pytest.fixture(scope="module")
def materials(tmp_path_factory: pytest.TempPathFactory) -> Materials:
    root = tmp_path_factory.mktemp("bad-inputs")
    artifact = write_tiny_artifact(root / "artifact")
    noise = random.Random(0).randbytes(512)
    artifacts = {
        "missing": root / "no-such-artifact",
        "empty_dir": root / "empty-dir",
        "a_file": root / "a-file",
        "corrupt_manifest": _broken(artifact, root / "a1", lambda a: (a / "manifest.json").write_text("{oops")),
        "manifest_not_an_object": _broken(artifact, root / "a2", lambda a: (a / "manifest.json").write_text("[1]")),
        "truncated_text_weights": _broken(artifact, root / "a3",
                                          lambda a: _truncate(a / "clip-text" / "model.safetensors")),
        "garbage_vision_weights": _broken(artifact, root / "a4",
                                          lambda a: (a / "clip-vision" / "model.safetensors").write_bytes(noise)),
        "corrupt_text_config": _broken(artifact, root / "a5",
                                       lambda a: (a / "clip-text" / "config.json").write_text("{bad")),
        "missing_vision_tower": _broken(artifact, root / "a6", lambda a: shutil.rmtree(a / "clip-vision")),
    }
    artifacts["empty_dir"].mkdir()
    artifacts["a_file"].write_text("not a directory")
    files = {"missing": root / "absent.yaml", "empty": root / "empty.yaml", "binary": root / "binary.yaml",
             "not_yaml": root / "not-yaml.yaml", "a_list": root / "list.yaml", "bad_spec": root / "bad-spec.yaml",
             "wrong_kind": root / "kind.yaml", "missing_data": root / "missing-data.yaml",
             "directory": root / "a-dir.yaml"}
    files["empty"].write_text("")
    files["binary"].write_bytes(noise)
    files["not_yaml"].write_text("spec:\n  data: [train\n")
    files["a_list"].write_text("- 1\n- 2\n")
    files["bad_spec"].write_text("spec:\n  data: {train: s3://b/t.csv}\n  training: {epochs: 0, learningRate: -1}\n")
    files["wrong_kind"].write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {}\n")
    files["missing_data"].write_text("spec:\n  data: {train: nowhere/train.csv}\n")
    files["directory"].mkdir()
    for name, data in (("empty.png", b""), ("binary.png", noise), ("text.png", b"this is text, not an image\n")):
        (root / name).write_bytes(data)
    (root / "dir.png").mkdir()
    images = {"missing": str(root / "absent.png"), "empty": str(root / "empty.png"),
              "binary": str(root / "binary.png"), "text": str(root / "text.png"), "directory": str(root / "dir.png"),
              "unreachable_http": "http://127.0.0.1:1/cat.png", "bad_http": "http://[::1/cat.png",
              "bad_port": "http://localhost:port/cat.png", "s3_no_bucket": "s3:///cat.png",
              "s3_no_key": "s3://bucket", "s3_no_endpoint": "s3://bucket/cat.png"}
    kubeconfigs = {"missing": root / "absent-kubeconfig", "empty": root / "empty-kubeconfig",
                   "binary": root / "binary-kubeconfig", "not_yaml": root / "bad-kubeconfig",
                   "a_list": root / "list-kubeconfig", "unreachable": root / "kubeconfig"}
    kubeconfigs["empty"].write_text("")
    kubeconfigs["binary"].write_bytes(noise)
    kubeconfigs["not_yaml"].write_text("clusters: [\n")
    kubeconfigs["a_list"].write_text("- a\n")
    kubeconfigs["unreachable"].write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    return Materials(root, artifact, artifacts, files, images, kubeconfigs)


# ------------------------------------------------------------------------------------------------ invocations
@dataclasses.dataclass(frozen=True)
class Call:
    argv: list[str]
    kubeconfig: str = "unreachable"


Draw = Callable[[st.SearchStrategy[Any]], Any]
RUN_NAMES = st.sampled_from(["quickstart", "Not-A-Name", "a/b", "x" * 300])
BAD_FILE_KINDS = st.sampled_from(["missing", "empty", "binary", "not_yaml", "a_list", "bad_spec", "wrong_kind",
                                  "missing_data", "directory"])
KUBECONFIG_KINDS = st.sampled_from(["missing", "empty", "binary", "not_yaml", "a_list", "unreachable"])
BAD_OUTPUT = st.sampled_from([["-o", "xml"], ["--output", ""], ["-o"]])
UNKNOWN_FLAG = st.sampled_from([["--bogus"], ["--namespace"], ["-Z"]])


def _run_file(draw: Draw, m: Materials, verb: list[str]) -> Call:
    """A bad run file; or the good one with a cluster that cannot be reached or a bad flag."""
    how = draw(st.sampled_from(["bad_file", "no_cluster", "bad_flag"]))
    if how == "bad_file":
        return Call([*verb, str(m.files[draw(BAD_FILE_KINDS)])])
    if how == "no_cluster" and "--local" not in verb:
        return Call([*verb, str(QUICKSTART)], draw(KUBECONFIG_KINDS))
    a_file = m.artifacts["a_file"]
    flags = [["--gpus", "two"], ["--gpus", "-1"], ["--bogus"]] + (
        [["--output-dir", str(a_file)], ["--output-dir", str(a_file / "sub")]] if "--local" in verb
        else [["--name", "Bad_N"]])
    return Call([*verb, str(QUICKSTART), *draw(st.sampled_from(flags))])


def _named(draw: Draw, verb: list[str], flags: list[list[str]]) -> Call:
    """A run by name against no usable cluster, or a bad flag (checked before any cluster is asked)."""
    if draw(st.booleans()):
        return Call([*verb, draw(RUN_NAMES)], draw(KUBECONFIG_KINDS))
    return Call([*verb, draw(RUN_NAMES), *draw(st.sampled_from(flags))])


# the commands' builders: (draw, materials) → a call that must fail as a user error
def b_run_local(draw: Draw, m: Materials) -> Call:
    return _run_file(draw, m, ["run", "--local"])


def b_run(draw: Draw, m: Materials) -> Call:
    return _run_file(draw, m, ["run"])


def b_submit(draw: Draw, m: Materials) -> Call:
    return _run_file(draw, m, ["submit", *draw(st.sampled_from([[], ["--dry-run"], ["-o", "name"]]))])


def b_validate(draw: Draw, m: Materials) -> Call:
    if draw(st.booleans()):
        return Call(["validate", str(m.files[draw(BAD_FILE_KINDS)])])
    return Call(["validate", "--server", str(QUICKSTART)], draw(KUBECONFIG_KINDS))


def b_explain(draw: Draw, m: Materials) -> Call:
    field = draw(st.one_of(
        st.sampled_from(["spec.training.learningrat", "spec.learningRate", "spec..x", "spec.training.epochs.deep",
                         "status.phase.x", "finetunerun.nope", "."]),
        st.text(st.sampled_from("abcXYZ._[]-"), max_size=12).map(lambda t: f"spec.zz{t}")))
    return Call(["explain", field, *draw(st.sampled_from([[], ["--recursive"], ["-o", "json"]]))])


def b_list(draw: Draw, m: Materials) -> Call:
    if draw(st.booleans()):
        return Call(["list", *draw(st.sampled_from([[], ["-A"], ["-l", "team=search"], ["-o", "name"]]))],
                    draw(KUBECONFIG_KINDS))
    return Call(["list", *draw(st.one_of(BAD_OUTPUT, UNKNOWN_FLAG, st.just(["-l"])))])


def b_status(draw: Draw, m: Materials) -> Call:
    return _named(draw, ["status"], [["-o", "xml"], ["--bogus"]])


def b_describe(draw: Draw, m: Materials) -> Call:
    return _named(draw, ["describe"], [["-o", "wide"], ["--bogus"]])


def b_delete(draw: Draw, m: Materials) -> Call:
    if draw(st.booleans()):
        return Call(["delete", draw(RUN_NAMES), draw(RUN_NAMES)], draw(KUBECONFIG_KINDS))
    return Call(["delete", *draw(st.sampled_from([[], ["--bogus", "x"]]))])


def b_wait(draw: Draw, m: Materials) -> Call:
    return _named(draw, ["wait"], [["--for", "phase=Nope"], ["--for", "condition="], ["--for", "deleted"],
                                   ["--for", ""], ["--timeout", "10x"], ["--timeout", "-1s"], ["--interval", "0"]])


def b_logs(draw: Draw, m: Materials) -> Call:
    return _named(draw, ["logs"], [["--since", "5y"], ["--since", "-10m"], ["--tail", "-5"], ["--tail", "many"],
                                   ["-f", "--tail", "3"], ["-f", "--previous"], ["-f", "--since", "1m"]])


def b_cancel(draw: Draw, m: Materials) -> Call:
    return _named(draw, ["cancel"], [["--delete=yes"], ["--bogus"]])


def b_artifact_pull(draw: Draw, m: Materials) -> Call:
    if draw(st.booleans()):
        return Call(["artifact", "pull", draw(RUN_NAMES), str(m.root / "out")], draw(KUBECONFIG_KINDS))
    return Call(["artifact", "pull", "run", str(m.artifacts["a_file"])])


def b_artifact_verify(draw: Draw, m: Materials) -> Call:
    kinds = ["missing", "empty_dir", "a_file", "corrupt_manifest", "manifest_not_an_object", "truncated_text_weights",
             "garbage_vision_weights", "corrupt_text_config", "missing_vision_tower"]
    return Call(["artifact", "verify", str(m.artifacts[draw(st.sampled_from(kinds))])])


# which tower each broken artifact fails to load (encode reads the tower it needs, not the manifest)
ENCODE_BREAKS = {"missing": ("--text", "--image"), "empty_dir": ("--text", "--image"), "a_file": ("--text", "--image"),
                 "truncated_text_weights": ("--text",), "corrupt_text_config": ("--text",),
                 "garbage_vision_weights": ("--image",), "missing_vision_tower": ("--image",)}


def b_encode(draw: Draw, m: Materials) -> Call:
    how = draw(st.sampled_from(["artifact", "image", "flags"]))
    if how == "artifact":
        kind = draw(st.sampled_from(sorted(ENCODE_BREAKS)))
        flag = draw(st.sampled_from(ENCODE_BREAKS[kind]))
        value = "a red circle" if flag == "--text" else str(EVAL_IMAGE)
        return Call(["encode", str(m.artifacts[kind]), flag, value])
    if how == "image":
        return Call(["encode", str(m.artifact), "--image", m.images[draw(st.sampled_from(sorted(m.images)))]])
    flags = draw(st.sampled_from([[], ["--text", "a", "--image", str(EVAL_IMAGE)], ["--text", "a", "--onnx"],
                                  ["--text", "a", "--device", "cuda:99"], ["--text", "a", "--device", "gpu"],
                                  ["--text", "a", "--save", str(m.root / "no-dir" / "e.npy")],
                                  ["--text", "a", "--save", str(m.root)], ["--text", "a", "-o", "name"]]))
    return Call(["encode", str(m.artifact), *flags])


def b_report(draw: Draw, m: Materials) -> Call:
    how = draw(st.sampled_from(["artifact", "name", "flags"]))
    if how == "artifact":
        kinds = sorted(set(m.artifacts) - {"missing"})
        target = str(m.artifacts[draw(st.sampled_from(kinds))]) if draw(st.booleans()) else str(m.artifact)
        return Call(["report", target, "--out", str(m.root / "report.html")])
    if how == "name":
        return Call(["report", draw(st.sampled_from(["quickstart", "run-1"]))], draw(KUBECONFIG_KINDS))
    return Call(["report", str(m.artifact), *draw(st.sampled_from([["--top-k", "0"], ["-k", "x"],
                                                                    ["--out", str(m.root)]]))])


def b_models(draw: Draw, m: Materials) -> Call:
    return Call(["models", *draw(st.one_of(BAD_OUTPUT, UNKNOWN_FLAG))])


def b_models_stage(draw: Draw, m: Materials) -> Call:
    ref = draw(st.sampled_from(["ViT-B-32", "::laion", "ViT-B-32::", "ViT-B-32::laion2b_s34b_b79k"]))
    dest = draw(st.sampled_from(["s3://", "http://models/x", "models/x", "s3://models/vit"]))
    source = draw(st.sampled_from([[], ["--from", str(m.root / "absent.pt")], ["--from", str(m.root)]]))
    if ref.count("::") == 1 and ref.split("::")[0] and ref.split("::")[1] and dest == "s3://models/vit" and \
            not source:
        dest = "s3://"  # a valid call would stage for real: keep every drawn call a bad one
    return Call(["models", "stage", ref, dest, *source])


def data_sets(root: Path) -> dict[str, Path]:
    """Broken sets for the data tools, written once under ``root``: a missing image, unknown columns, a file that is
    not UTF-8, a header and no rows, a directory, nothing at all."""
    folder = root / "data-sets"
    sets = {"missing_image": folder / "missing.csv", "wrong_columns": folder / "columns.csv",
            "not_utf8": folder / "latin1.csv", "no_rows": folder / "empty.csv", "a_directory": folder,
            "absent": folder / "absent.csv"}
    if not folder.is_dir():
        folder.mkdir()
        sets["missing_image"].write_text(f"text,image\na red circle,{EVAL_IMAGE}\na blue square,gone.png\n")
        sets["wrong_columns"].write_text(f"caption,url\na red circle,{EVAL_IMAGE}\n")
        sets["not_utf8"].write_bytes("text,image\nun caf\u00e9,x.png\n".encode("latin-1"))
        sets["no_rows"].write_text("text,image\n")
    return sets


def b_data(draw: Draw, m: Materials) -> Call:
    return Call(["data", *draw(st.sampled_from([["--bogus"], ["valid"], ["shard-it", "x"]]))])


def b_data_validate(draw: Draw, m: Materials) -> Call:
    source = str(draw(st.sampled_from(sorted(data_sets(m.root).items())))[1])
    flags = draw(st.sampled_from([[], ["--workers", "0"], ["-o", "xml"], ["--text-column", "caption"]]))
    return Call(["data", "validate", source, "--no-tokens", *flags])


def b_data_shard(draw: Draw, m: Materials) -> Call:
    source = str(draw(st.sampled_from(sorted(data_sets(m.root).items())))[1])
    dest = draw(st.sampled_from(["s3://", "s3://Bad_Bucket/x/", str(m.root / "shards")]))
    flags = draw(st.sampled_from([[], ["--shard-size", "0"], ["--workers", "0"]]))
    return Call(["data", "shard", source, dest, *flags])


def b_unknown(draw: Draw, m: Materials) -> Call:
    return Call(draw(st.sampled_from([["lsit"], ["delet", "x"], ["artifact", "push"], ["--bogus"],
                                      ["models", "unstage"]])))


BUILDERS: dict[str, Callable[[Draw, Materials], Call]] = {
    name.removeprefix("b_"): fn for name, fn in globals().items() if name.startswith("b_") and callable(fn)}


def invoke(call: Call, m: Materials) -> Any:
    env = {"KUBECONFIG": str(m.kubeconfigs[call.kubeconfig]), "KUBETUNE_NAMESPACE": None,
           "AWS_ENDPOINT_URL_S3": None, "AWS_ENDPOINT_URL": None, "KUBERNETES_SERVICE_HOST": None,
           "KUBETUNE_DEBUG": None}
    return runner.invoke(app, call.argv, env=env)


def assert_user_error(result: Any, call: Call) -> None:
    where = f"{call.argv} (KUBECONFIG {call.kubeconfig}):\n{result.output[-2000:]}"
    assert "Traceback" not in result.output, where
    assert result.exception is None or isinstance(result.exception, SystemExit), where
    assert result.exit_code in USER_ERROR_CODES, f"exit {result.exit_code}: {where}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # each error is one line (`delete` of several missing names: one each, as kubectl), then one hint line
    hints_at = [i for i, line in enumerate(lines) if line.startswith("hint: ")]
    assert len(hints_at) == 1 and hints_at[0] > 0 and lines[hints_at[0] - 1].startswith("error: "), where


# ------------------------------------------------------------------------------------------------ the property
def test_every_command_has_bad_inputs_drawn() -> None:
    root = typer.main.get_command(app)
    paths = set()
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        paths.add(name)
        paths.update(f"{name}_{sub}" for sub in getattr(command, "commands", {}))
    assert paths - {"artifact"} <= set(BUILDERS), paths - set(BUILDERS)


@pytest.mark.parametrize("command", sorted(BUILDERS))  # each command gets its share of the examples
@settings(max_examples=20, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_command_answers_a_user_error_with_a_traceback(materials: Materials, command: str,
                                                          data: st.DataObject) -> None:
    call = BUILDERS[command](data.draw, materials)
    assert_user_error(invoke(call, materials), call)


# ------------------------------------------------------------------------------------------------ examples
def test_encode_a_file_that_is_not_an_image(materials: Materials) -> None:
    for kind, words in (("text", "not an image"), ("binary", "not an image"), ("empty", "an empty file")):
        call = Call(["encode", str(materials.artifact), "--image", materials.images[kind]])
        result = invoke(call, materials)
        assert_user_error(result, call)
        assert result.exit_code == errors.EXIT_USAGE and words in result.stderr


def test_encode_an_unreachable_url_is_unavailable_and_a_bad_s3_uri_is_usage(materials: Materials) -> None:
    call = Call(["encode", str(materials.artifact), "--image", "http://127.0.0.1:1/cat.png"])
    result = invoke(call, materials)
    assert_user_error(result, call)
    assert result.exit_code == errors.EXIT_UNAVAILABLE and "127.0.0.1:1" in result.stderr
    for uri in ("s3://bucket", "s3:///cat.png"):
        call = Call(["encode", str(materials.artifact), "--image", uri])
        result = invoke(call, materials)
        assert result.exit_code == errors.EXIT_USAGE and "not an s3://BUCKET/KEY URI" in result.stderr


def test_a_corrupt_artifact_is_exit_6_naming_the_tower(materials: Materials) -> None:
    for kind, flag, value in (("truncated_text_weights", "--text", "a red circle"),
                              ("corrupt_text_config", "--text", "a red circle"),
                              ("garbage_vision_weights", "--image", str(EVAL_IMAGE))):
        call = Call(["encode", str(materials.artifacts[kind]), flag, value])
        result = invoke(call, materials)
        assert_user_error(result, call)
        assert result.exit_code == errors.EXIT_ARTIFACT and "cannot load it" in result.stderr, result.stderr
        assert ("clip-text" if flag == "--text" else "clip-vision") in result.stderr
    call = Call(["artifact", "verify", str(materials.artifacts["corrupt_manifest"])])
    result = invoke(call, materials)
    assert result.exit_code == errors.EXIT_ARTIFACT and "not a kubetune manifest" in result.stderr
    call = Call(["artifact", "verify", str(materials.artifacts["truncated_text_weights"])])
    result = invoke(call, materials)
    assert result.exit_code == errors.EXIT_ARTIFACT and "clip-text/model.safetensors" in result.stderr


def test_save_into_a_missing_directory_fails_before_anything_is_encoded(materials: Materials) -> None:
    target = materials.root / "missing" / "dir" / "e.npy"
    call = Call(["encode", str(materials.artifact), "--text", "a red circle", "--save", str(target)])
    result = invoke(call, materials)
    assert_user_error(result, call)
    assert result.exit_code == errors.EXIT_USAGE and "does not exist" in result.stderr
    assert not target.parent.exists()


def test_the_intact_artifact_encodes(materials: Materials, tmp_path: Path) -> None:
    """The materials' artifact is good: the failures above are the damage's, not the fixture's."""
    result = invoke(Call(["encode", str(materials.artifact), "--text", "a red circle", "--save",
                          str(tmp_path / "e.npy"), "-o", "json"]), materials)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shape"] == [1, 32] and (tmp_path / "e.npy").is_file()
    result = invoke(Call(["encode", str(materials.artifact), "--image", str(EVAL_IMAGE)]), materials)
    assert result.exit_code == 0, result.output


def test_get_model_on_cuda_without_a_gpu_is_config_invalid(materials: Materials) -> None:
    import kubetune
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(errors.ConfigInvalid, match="no CUDA GPU") as info:
        kubetune.get_model(materials.artifact, "clip-text", device="cuda")
    assert info.value.hint and "cpu" in info.value.hint
    with pytest.raises(errors.ConfigInvalid, match="not a torch device"):
        kubetune.get_model(materials.artifact, "clip-text", device="gpu")
    call = Call(["encode", str(materials.artifact), "--text", "a", "--device", "cuda"])
    result = invoke(call, materials)
    assert_user_error(result, call)
    assert result.exit_code == errors.EXIT_USAGE


def test_get_model_on_a_gpu_encodes_as_on_the_cpu(materials: Materials) -> None:
    import kubetune
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no GPU on this machine")
    texts = ["a red circle on a white background", "a blue cross"]
    on_cpu = kubetune.encode(kubetune.get_model(materials.artifact, "clip-text"), texts)
    on_gpu = kubetune.encode(kubetune.get_model(materials.artifact, "clip-text", device="cuda"), texts)
    assert np.allclose(on_cpu, on_gpu, atol=1e-4)
    with pytest.raises(errors.ConfigInvalid, match="CUDA GPU"):
        kubetune.get_model(materials.artifact, "clip-text", device=f"cuda:{torch.cuda.device_count()}")


def test_a_bad_kubeconfig_is_unavailable_not_a_traceback(materials: Materials) -> None:
    for kind in ("missing", "empty", "binary", "not_yaml", "a_list", "unreachable"):
        call = Call(["list"], kind)
        result = invoke(call, materials)
        assert_user_error(result, call)
        assert result.exit_code == errors.EXIT_UNAVAILABLE


def test_a_bug_is_exit_70_without_a_traceback_unless_debugging(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.sdk import models

    def broken(all_pretrained: bool = False) -> list[dict[str, Any]]:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(models, "describe_models", broken)
    result = runner.invoke(app, ["models"], env={"KUBETUNE_DEBUG": None})
    assert result.exit_code == EXIT_INTERNAL and "Traceback" not in result.output
    assert result.stderr.splitlines() == [
        "error: unexpected RuntimeError: boom",
        "hint: this is a kubetune bug: please report it with the command; KUBETUNE_DEBUG=1 shows the traceback"]
    result = runner.invoke(app, ["models"], env={"KUBETUNE_DEBUG": "1"})
    assert isinstance(result.exception, RuntimeError)


def test_a_reader_that_goes_away_ends_the_listing_quietly() -> None:
    """`kubetune models | head -0`: the reader has gone before the first line is written, so every write fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "kubetune.sdk.cli", "models", "--all"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (errors.EXIT_BROKEN_PIPE, "")
