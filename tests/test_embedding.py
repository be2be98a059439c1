"""CoPatch as a frozen submodule of another LightningModule: a pseudo-label teacher.

A small host trains a 1-layer head on the teacher's masks (the demo CLIP on demo scenes) for a few
steps on CPU: in float32 and bf16-mixed, saved with and without the teacher's weights, and under DDP
with two processes (`examples/teacher.py --devices 2` in a subprocess under a timeout).
"""

import json
import math
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

from copatch.demo.dataset import demo_image
from copatch.module import CoPatch

EXAMPLES = Path(__file__).parents[1] / "examples"
DDP_TIMEOUT_S = 120


def scenes(n: int = 4, seed: int = 1) -> list[dict]:
    """Demo scenes as a host's batch items: image `[3, H, W] uint8`, E texts, proposals `[N, H, W] bool`."""
    out = []
    for i in range(n):
        _, image, _, chosen, proposals = demo_image(seed, i)
        out.append({"image": torch.from_numpy(image).permute(2, 0, 1), "texts": [c.text for c in chosen],
                    "proposals": torch.from_numpy(proposals)})
    return out


class Host(pl.LightningModule):
    """A host with a CoPatch teacher and a 1-layer head trained on the union of the teacher's masks."""

    def __init__(self, save_teacher: bool = True, lr: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.teacher = CoPatch.from_preset("demo", save_in_checkpoint=save_teacher)
        self.head = nn.Conv2d(3, 1, kernel_size=3, padding=1)
        self.seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        labels = []
        for scene in batch:
            preds = self.teacher.segment(scene["image"], scene["texts"], proposals=scene["proposals"])
            labels.append(torch.stack([p.mask for p in preds]).any(0))
            self.seen.append({"chosen": [p.chosen for p in preds], "dtype": preds[0].mask.dtype,
                              "shape": tuple(preds[0].mask.shape), "autocast": torch.is_autocast_enabled("cpu"),
                              "teacher_training": any(m.training for m in self.teacher.modules())})
        images = torch.stack([s["image"] for s in batch]).to(self.head.weight.dtype) / 255  # bf16 in bf16-true
        target = torch.stack(labels)[:, None].float()
        return F.binary_cross_entropy_with_logits(self.head(images).float(), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)  # all of them: the teacher's are frozen


def fit(host: Host, tmp_path, steps: int = 3, precision: str = "32-true") -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    data = torch.utils.data.DataLoader(scenes(), batch_size=2, collate_fn=lambda batch: batch)
    with warnings.catch_warnings():  # the teacher's modules are in eval mode on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning)
        trainer.fit(host, data)
    return trainer


def teacher_weights(module: CoPatch) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.full_state_dict().items()}


def test_no_trainable_parameter_and_no_train_mode_leak_into_the_host():
    host = Host()
    assert [n for n, p in host.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    scene = scenes(1)[0]
    before = host.teacher.segment(scene["image"], scene["texts"], proposals=scene["proposals"])
    host.train()
    assert host.training and host.head.training
    assert not any(m.training for m in host.teacher.modules())
    after = host.teacher.segment(scene["image"], scene["texts"], proposals=scene["proposals"])
    assert [(p.chosen, p.candidates, p.candidate_scores) for p in before] == \
        [(p.chosen, p.candidates, p.candidate_scores) for p in after]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_host_fit_trains_the_head_on_the_teachers_masks(precision, tmp_path):
    host = Host()
    head, teacher = host.head.weight.detach().clone(), teacher_weights(host.teacher)
    trainer = fit(host, tmp_path, steps=3, precision=precision)
    assert trainer.global_step == 3
    assert not torch.equal(host.head.weight, head), "the head trained"
    after = host.teacher.full_state_dict()
    assert all(torch.equal(after[k], v) for k, v in teacher.items()), "the teacher did not"
    assert len(host.seen) == 6
    assert all(s["dtype"] == torch.bool and s["shape"] == (128, 128) and not s["teacher_training"] for s in host.seen)
    assert all(s["autocast"] == (precision == "bf16-mixed") for s in host.seen)
    # In bf16 the encoders' numbers change a little; the picks hardly (scores and CoMap are float32).
    reference = [host.teacher.segment(s["image"], s["texts"], proposals=s["proposals"]) for s in scenes()]
    expected = [[p.chosen for p in preds] for preds in reference] * 2  # two epochs of 2 batches of 2
    agree = [a == b for seen, exp in zip(host.seen, expected) for a, b in zip(seen["chosen"], exp)]
    assert sum(agree) >= (1.0 if precision == "32-true" else 0.8) * len(agree)


def test_host_fit_in_bf16_true(tmp_path):
    """The host casts every weight, the teacher's too, to bf16: the teacher's encoders then run under a
    bf16 autocast, and its masks still come out."""
    host = Host()
    fit(host, tmp_path, steps=2, precision="bf16-true")
    assert host.teacher.backbone.model.visual.conv1.weight.dtype == torch.bfloat16
    assert len(host.seen) == 4 and all(s["dtype"] == torch.bool and s["shape"] == (128, 128) for s in host.seen)


def test_the_teacher_follows_the_host_device():
    host = Host()
    host.to("meta")
    assert host.teacher.device == torch.device("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_teacher_follows_the_host_to_the_gpu():
    host, scene = Host(), scenes(1)[0]
    cpu = host.teacher.segment(scene["image"], scene["texts"], proposals=scene["proposals"])
    host.cuda()
    gpu = host.teacher.segment(scene["image"], scene["texts"], proposals=scene["proposals"])
    assert host.teacher.device.type == "cuda"
    assert [p.chosen for p in gpu] == [p.chosen for p in cpu]


@pytest.mark.parametrize("save_teacher", [True, False])
def test_the_host_checkpoint_with_or_without_the_teacher(save_teacher, tmp_path):
    host = Host(save_teacher=save_teacher)
    teacher = teacher_weights(host.teacher)
    trainer = fit(host, tmp_path, steps=1)
    path = tmp_path / "host.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    teacher_keys = {k for k in state if k.startswith("teacher.")}
    assert {"head.weight", "head.bias"} <= set(state)
    assert teacher_keys == ({f"teacher.{k}" for k in teacher} if save_teacher else set())
    assert host.teacher.full_state_dict().keys() == teacher.keys()  # its own view is always complete

    loaded = Host.load_from_checkpoint(path)  # strict: passes both ways
    assert torch.equal(loaded.head.weight, host.head.weight)
    after = loaded.teacher.full_state_dict()
    assert all(torch.equal(after[k], v) for k, v in teacher.items())

    if save_teacher:  # the teacher's weights really come from the checkpoint
        full = torch.load(path, map_location="cpu", weights_only=False)
        key = "teacher.backbone.model.logit_scale"
        full["state_dict"][key] = full["state_dict"][key] + 1
        torch.save(full, tmp_path / "changed.ckpt")
        changed = Host.load_from_checkpoint(tmp_path / "changed.ckpt")
        assert torch.equal(changed.teacher.backbone.model.logit_scale, teacher[key[len("teacher."):]] + 1)
    else:  # a host that wants the teacher in its checkpoint refuses one without it
        with pytest.raises(RuntimeError, match="Missing key"):
            Host(save_teacher=True).load_state_dict(state)


def hooks_on(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks]


class RaisingParser:
    def parse(self, texts):
        raise RuntimeError("parser failed")


def test_no_forward_hook_survives_a_call_or_an_exception(monkeypatch):
    host, scene = Host(), scenes(1)[0]
    args = (scene["image"], scene["texts"])
    host.teacher.segment(*args, proposals=scene["proposals"])
    assert hooks_on(host) == []

    # An exception while CoPatch's hooks are on the ViT blocks (inside the token-masked pass).
    seen = {}
    real = host.teacher.backbone.encode_image

    def failing(pixels):
        seen["hooks"] = hooks_on(host)
        raise RuntimeError("encoder failed")

    monkeypatch.setattr(host.teacher.backbone, "encode_image", failing)
    with pytest.raises(RuntimeError, match="encoder failed"):
        host.teacher.segment(*args, proposals=scene["proposals"])
    assert seen["hooks"], "the hooks were on during the pass"
    assert hooks_on(host) == []
    monkeypatch.setattr(host.teacher.backbone, "encode_image", real)

    # An exception in a later stage (the parser).
    host.teacher._parser = RaisingParser()
    with pytest.raises(RuntimeError, match="parser failed"):
        host.teacher.segment(*args, proposals=scene["proposals"])
    assert hooks_on(host) == []
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_host_ddp_fit_with_two_processes(tmp_path, run_python):
    """`examples/teacher.py --devices 2`: DDP over gloo on CPU; every rank trains the same head."""
    proc = run_python([str(EXAMPLES / "teacher.py"), "--devices", "2", "--steps", "3"], cwd=tmp_path,
                      timeout=DDP_TIMEOUT_S, what="the DDP fit (a gloo hang?)")
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    # The ranks share the pipe: take each rank's one-line JSON wherever it landed.
    results = sorted((json.loads(m) for m in re.findall(r"RESULT (\{[^{}]*\})", out)), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1], out[-3000:]
    for r in results:
        assert r["world_size"] == 2 and r["steps"] == 3 and len(r["losses"]) == 3
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["trainable"] == ["head.weight", "head.bias"] and r["teacher_stayed_in_eval"]
    # DDP averaged the gradients: both ranks end with the same head, though they saw different scenes.
    assert results[0]["head_checksum"] == pytest.approx(results[1]["head_checksum"], abs=1e-6)
    assert results[0]["head_abs_checksum"] == pytest.approx(results[1]["head_abs_checksum"], abs=1e-6)
    assert results[0]["losses"] != results[1]["losses"]
