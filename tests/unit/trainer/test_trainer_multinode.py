"""Training across pods: the trainer's launcher started twice on this machine, as two pods of a run over
``spec.resources.nodes: 2`` would be (``KUBETUNE_NODE_RANK`` 0 and 1, rank 1 given rank 0's rendezvous), with
torchrun's static rendezvous and gloo. The result must equal one pod running both processes (``--nproc 2``):
same world size, same global batch, same seed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from kt_trainer_helpers import of_type, tiny_spec, write_run
from kubetune.api.events import parse_line
from kubetune_trainer.__main__ import Nodes
from safetensors.torch import load_file

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", KUBETUNE_PROGRESS_SECONDS="0",
               PYTHONPATH=os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer-image"),
                                           env.get("PYTHONPATH", "")]), **extra)
    return env


def _launch(root: Path, config: Path, extra_env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kubetune_trainer", "--config", str(config),
                             "--output-dir", str(root), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(extra_env), cwd=root)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    """Both towers' weights of the artifact, keyed by tower and name."""
    merged: dict[str, torch.Tensor] = {}
    for path in sorted((out / "artifact").rglob("model.safetensors")):
        merged.update({f"{path.parent.name}:{k}": v for k, v in load_file(str(path)).items()})
    return merged


@pytest.fixture(scope="module")
def two_ways(synthetic_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    spec = tiny_spec(str(synthetic_data["train"]), data={"train": str(synthetic_data["train"])},
                     training={"epochs": 2, "learningRate": 2e-3}, callbacks={"evaluation": {"enabled": False}})
    one = tmp_path_factory.mktemp("one-pod")
    single = _launch(one, write_run(one / "run.yaml", spec), {}, "--nproc", "2")
    single_out = single.communicate(timeout=300)

    spec = {**spec, "resources": {**spec["resources"], "nodes": 2, "procsPerNode": 1}}
    port = _free_port()
    pods = [tmp_path_factory.mktemp(f"node-{rank}") for rank in (0, 1)]
    launched = [_launch(root, write_run(root / "run.yaml", spec),
                        {"KUBETUNE_NODE_RANK": str(rank), "KUBETUNE_RENDEZVOUS": f"127.0.0.1:{port}"})
                for rank, root in enumerate(pods)]
    outputs = [p.communicate(timeout=300) for p in launched]
    return {"single": (single, single_out, one), "nodes": list(zip(launched, outputs, pods, strict=True))}


def test_two_pods_train_one_model_with_global_rank_0_in_node_rank_0(two_ways: dict[str, Any]) -> None:
    for proc, (stdout, stderr), _ in two_ways["nodes"]:
        assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    (_, (out0, _), root0), (_, (out1, _), root1) = two_ways["nodes"]
    events = [e for e in (parse_line(line) for line in out0.splitlines()) if e is not None]
    assert events[0].type == "started" and events[0].model_extra["world_size"] == 2
    assert events[-1].type == "finished"
    assert not [line for line in out1.splitlines() if parse_line(line) is not None]  # node 1 has no rank 0
    assert (root0 / "artifact").is_dir() and not (root1 / "artifact").exists()
    losses = [e.train_loss for e in of_type(events, "metrics")]
    assert losses[-1] is not None and losses[0] is not None and losses[-1] < losses[0]


def test_two_pods_equal_one_pod_with_two_processes(two_ways: dict[str, Any]) -> None:
    single, (stdout, stderr), one = two_ways["single"]
    assert single.returncode == 0, stdout[-2000:] + stderr[-4000:]
    (_, _, root0), _ = two_ways["nodes"]
    reference, multi = _weights(one), _weights(root0)
    assert reference and reference.keys() == multi.keys()
    worst = max(float((reference[k].float() - multi[k].float()).abs().max()) for k in reference)
    assert worst <= 1e-5, worst


def test_rank_0_hosts_the_rendezvous_on_the_loopback_and_the_others_use_its_address() -> None:
    rank0 = Nodes(2, 0, "10.96.0.7:29500", 600, "uid-a1").torchrun_args()
    rank1 = Nodes(2, 1, "10.96.0.7:29500", 600, "uid-a1").torchrun_args()
    assert "--master-addr=127.0.0.1" in rank0 and "--master-addr=10.96.0.7" in rank1
    for args in (rank0, rank1):
        assert {"--nnodes=2", "--rdzv-backend=static", "--master-port=29500", "--rdzv-conf=timeout=600"} <= set(args)
    assert "--node-rank=0" in rank0 and "--node-rank=1" in rank1


def test_a_pod_of_a_run_over_several_pods_without_its_rank_is_a_config_error(
        synthetic_data: dict[str, Path], tmp_path: Path) -> None:
    spec = tiny_spec(str(synthetic_data["train"]), resources={"gpus": 0, "nodes": 2})
    proc = _launch(tmp_path, write_run(tmp_path / "run.yaml", spec), {})
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 78, stderr[-2000:]
    assert "KUBETUNE_NODE_RANK" in stderr and "Traceback" not in stderr
