"""SigLIP from CLIP checkpoints, the tokenizer chosen by the config, and precisions that keep small updates."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from kt_trainer_helpers import TINY_CONFIG, of_type, run_trainer, tiny_spec, write_run
from kubetune.api.events import EXIT_BAD_CONFIG, parse_line
from kubetune.api.spec import ModelSpec
from kubetune_trainer import loop
from kubetune_trainer import model as model_lib
from open_clip.tokenizer import SimpleTokenizer

pytestmark = pytest.mark.unit
CPU = torch.device("cpu")


def test_siglip_trains_a_standard_clip_architecture(tmp_path: Path) -> None:
    # ViT-B-32 as every CLIP checkpoint has it: no logit_bias (random weights: the hub is unreachable here, and
    # the parameters the sigmoid loss needs are the same either way)
    torch.manual_seed(0)
    bundle = model_lib.build(ModelSpec(name="ViT-B-32", pretrained="random"), CPU, "fp32", tmp_path)
    model = bundle.model
    assert getattr(model, "logit_bias", None) is None
    assert model_lib.add_sigmoid_bias(model) is True
    assert float(model.logit_scale.exp()) == pytest.approx(10.0) and float(model.logit_bias) == -10.0
    assert any(p is model.logit_bias for p in model.parameters())  # trained, not a constant
    optimizer = loop.make_optimizer("adamw", loop.param_groups(model, 0.1), 1e-5)
    loss_fn = loop.make_loss("SigLIPLoss")
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    texts = bundle.tokenizer(["a red shoe", "a blue car", "a green tree", "a white cat"])
    model.train()
    losses = [loop.train_step(model, loss_fn, optimizer, [(images, texts)], CPU) for _ in range(3)]
    assert losses[2] < losses[1] < losses[0]
    assert float(model.logit_bias) != -10.0
    assert model_lib.add_sigmoid_bias(model) is False  # a model that has a bias keeps it


def test_siglip_run_on_a_config_without_a_bias_saves_the_trained_bias(tmp_path: Path,
                                                                      synthetic_data: dict[str, Path]) -> None:
    spec = tiny_spec(str(synthetic_data["train"]), training={"epochs": 3, "loss": "SigLIPLoss", "learningRate": 2e-3},
                     callbacks={"evaluation": {"enabled": False}})
    code, events, raw = run_trainer(["--config", str(write_run(tmp_path / "run.yaml", spec)),
                                     "--output-dir", str(tmp_path / "out")])
    assert code == 0, raw[-3000:]
    losses = [e.train_loss for e in of_type(events, "metrics")]
    assert losses[-1] is not None and losses[0] is not None and losses[-1] < 0.8 * losses[0]
    scalars = json.loads((tmp_path / "out" / "artifact" / "metadata.json").read_text())["model_scalars"]
    assert scalars["logit_bias"][0] != -10.0 and scalars["logit_bias"][0] < 0


def test_a_custom_config_named_siglip_keeps_its_own_tokenizer(tmp_path: Path) -> None:
    # open_clip.get_tokenizer would give this name the hub's SigLIP sentencepiece tokenizer (a download)
    bundle = model_lib.build(ModelSpec(name="siglip-tiny", config=copy.deepcopy(TINY_CONFIG)), CPU, "fp32", tmp_path)
    assert isinstance(bundle.tokenizer, SimpleTokenizer)
    assert bundle.tokenizer(["a red circle"]).shape == (1, TINY_CONFIG["text_cfg"]["context_length"])


def test_a_hub_tokenizer_out_of_reach_fails_with_one_sentence(tmp_path: Path,
                                                             synthetic_data: dict[str, Path]) -> None:
    config: dict[str, Any] = copy.deepcopy(TINY_CONFIG)
    config["text_cfg"]["hf_tokenizer_name"] = "timm/ViT-B-16-SigLIP"
    spec = tiny_spec(str(synthetic_data["train"]), model={"name": "kt-tiny-hub-tok", "config": config})
    run = write_run(tmp_path / "run.yaml", spec)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache, no hub
    proc = subprocess.run([sys.executable, "-m", "kubetune_trainer", "--config", str(run), "--output-dir",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == EXIT_BAD_CONFIG, proc.stderr[-3000:]
    (failed,) = [e for e in map(parse_line, proc.stdout.splitlines()) if e is not None and e.type == "failed"]
    assert failed.reason == "InvalidModel" and failed.retryable is False
    assert "timm/ViT-B-16-SigLIP" in failed.message and "Hugging Face hub" in failed.message
    assert "Traceback" not in proc.stderr


def test_amp_on_the_cpu_autocasts_to_bf16() -> None:
    with loop.autocast("amp", CPU)():
        out = torch.randn(4, 8) @ torch.randn(8, 4)
    assert out.dtype == torch.bfloat16
    assert loop.grad_scaler("amp", CPU) is None


Weights = dict[str, torch.Tensor]


def _train_bf16(tmp_path: Path, with_master: bool, steps: int = 30) -> tuple[Weights, Weights, Weights]:
    """(start, final bf16 weights, fp32 master weights or {}) of 30 lr-1e-5 AdamW steps in bf16."""
    torch.manual_seed(0)
    model = model_lib.build(ModelSpec(name="kt-tiny-bf16", config=copy.deepcopy(TINY_CONFIG)), CPU, "bf16",
                            tmp_path).model
    # open_clip's bf16 casts the matmul weights (norms, embeddings and the logit scale stay fp32)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    assert len(start) > 10
    groups = loop.param_groups(model, 0.0)
    master = loop.master_weights("bf16", groups) if with_master else None
    optimizer = loop.make_optimizer("adamw", master.groups if master else groups, 1e-5)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=gen)
    texts = torch.randint(1, 49000, (8, 16), generator=gen)
    model.train()
    for _ in range(steps):
        loop.train_step(model, loop.make_loss("CLIPLoss"), optimizer, [(images, texts)], CPU, "bf16", master=master)
    names = {id(p): n for n, p in model.named_parameters()}
    masters = {names[id(p)]: m.detach() for p, m in master.pairs if names[id(p)] in start} if master else {}
    return start, {n: p.detach().float() for n, p in model.named_parameters() if n in start}, masters


def test_bf16_keeps_small_learning_rate_updates_in_fp32_master_weights(tmp_path: Path) -> None:
    # Adam's steps are ~lr each: 30 steps of 1e-5 move a weight by up to ~3e-4. A bf16 weight above 0.05 has
    # an ulp of at least 2.4e-4: each single 1e-5 step is far below half of it and rounds away, while the sum
    # of 30 crosses it
    start, pure, _ = _train_bf16(tmp_path / "pure", with_master=False)
    start_m, final, masters = _train_bf16(tmp_path / "master", with_master=True)
    big = {n: start[n].abs() > 0.05 for n in start}  # weights where one step is far below half an ulp
    total = sum(int(b.sum()) for b in big.values())
    assert total > 1000

    def moved(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> float:
        return sum(int(((after[n] != before[n]) & big[n]).sum()) for n in before) / total

    assert moved(pure, start) < 0.01  # what bf16 AdamW without master weights keeps of the updates
    master_moved = sum(float(((masters[n] - start_m[n]).abs() * big[n]).sum()) for n in start_m) / total
    assert master_moved > 1e-4  # the fp32 masters took the 1e-5 steps
    assert moved(final, start_m) > 0.2  # ... and the bf16 weights follow them as they cross rounding steps
    for name, value in final.items():
        assert torch.equal(value, masters[name].to(torch.bfloat16).float()), name
