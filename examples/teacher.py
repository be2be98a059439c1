"""CoPatch as a frozen pseudo-label teacher inside another LightningModule.

    python examples/teacher.py [--devices 2] [--steps 3] [--precision bf16-mixed] [--checkpoint host.ckpt]

`Student` owns a `CoPatch` teacher (the demo CLIP) and a 1-layer convolutional head. Each training step
asks the teacher for the masks of the expressions of each scene and trains the head to predict, from
the pixels, where the referred objects are (the union of the teacher's masks). What the teacher
guarantees as a submodule (see the `CoPatch` docstring):

- it adds no trainable parameter: `configure_optimizers` can take `self.parameters()`;
- it stays in eval mode when the Trainer calls `train()` (Lightning's "modules in eval mode" warning
  names its modules; this script silences exactly that warning);
- it follows the host's device and precision (`--precision bf16-mixed`);
- `save_in_checkpoint=False` keeps its 8 M weights out of the host's checkpoint, and loading the
  checkpoint keeps the weights it loaded from its own file;
- it runs under the host's DDP (`--devices 2`: two CPU processes, gloo).

On exit every process prints one `RESULT {json}` line (rank, world size, steps, losses, the names of
the trainable parameters, whether the teacher stayed in eval mode, a checksum of the head's weights:
equal on every rank when DDP synchronised the gradients).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.utils.data import Dataset

from copatch.demo.dataset import demo_image
from copatch.module import CoPatch

# CoPatch keeps its modules in eval mode on purpose (a frozen teacher); Lightning warns about any.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning)


class DemoScenes(Dataset):
    """Scenes of the demo world: `{"image": [3, H, W] uint8, "texts": E str, "proposals": [N, H, W] bool}`."""

    def __init__(self, num_images: int = 8, seed: int = 1) -> None:
        self.num_images, self.seed = num_images, seed

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        _, image, _, chosen, proposals = demo_image(self.seed, index)
        return {"image": torch.from_numpy(image).permute(2, 0, 1), "texts": [c.text for c in chosen],
                "proposals": torch.from_numpy(proposals)}


def as_list(batch: list[dict]) -> list[dict]:
    """Collate: keep the scenes as a list (their numbers of expressions and proposals differ)."""
    return batch


class Student(pl.LightningModule):
    """A 1-layer head trained on the masks of a frozen CoPatch teacher.

    Args:
        lr: SGD learning rate of the head.
        save_teacher: whether the teacher's weights go into this module's checkpoints.
    """

    def __init__(self, lr: float = 0.5, save_teacher: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.teacher = CoPatch.from_preset("demo", save_in_checkpoint=save_teacher)
        self.head = nn.Conv2d(3, 1, kernel_size=3, padding=1)
        self.losses: list[float] = []
        self.teacher_stayed_in_eval = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` float images in [0, 1] -> `[B, 1, H, W]` logits of "referred by some expression"."""
        return self.head(images)

    @torch.no_grad()
    def pseudo_labels(self, scene: dict) -> torch.Tensor:
        """The union of the teacher's masks of the scene's expressions: `[H, W] bool`, on this device."""
        predictions = self.teacher.segment(scene["image"], scene["texts"], proposals=scene["proposals"])
        return torch.stack([p.mask for p in predictions]).any(0).to(self.device)

    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
        self.teacher_stayed_in_eval &= not any(m.training for m in self.teacher.modules())
        labels = torch.stack([self.pseudo_labels(scene) for scene in batch])[:, None].float()   # [B, 1, H, W]
        images = torch.stack([scene["image"] for scene in batch]).to(self.device, self.head.weight.dtype) / 255
        loss = F.binary_cross_entropy_with_logits(self(images).float(), labels)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # self.parameters() holds the teacher's weights too, but none of them requires grad.
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> Student:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (2 or more: DDP over gloo)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--precision", default="32-true", help="the host's precision, e.g. bf16-mixed")
    parser.add_argument("--checkpoint", help="save the host's checkpoint here (without the teacher's weights)")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    student = Student()
    data = torch.utils.data.DataLoader(DemoScenes(num_images=2 * args.batch_size * args.devices),
                                       batch_size=args.batch_size, collate_fn=as_list)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto", precision=args.precision,
                         max_steps=args.steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tempfile.mkdtemp(prefix="copatch-teacher-"))
    trainer.fit(student, data)
    if args.checkpoint:
        trainer.save_checkpoint(args.checkpoint)
    head = torch.cat([p.detach().flatten() for p in student.head.parameters()])
    result = "RESULT " + json.dumps({
        "rank": trainer.global_rank, "world_size": trainer.world_size, "steps": trainer.global_step,
        "losses": student.losses,
        "trainable": [name for name, p in student.named_parameters() if p.requires_grad],
        "teacher_stayed_in_eval": student.teacher_stayed_in_eval,
        "head_checksum": float(head.double().sum()), "head_abs_checksum": float(head.double().abs().sum()),
    })
    sys.stdout.write(result + "\n")  # one write: the ranks share the terminal (or pipe)
    sys.stdout.flush()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Shut gloo down while every rank is still here: left to interpreter exit, its teardown can abort
        # a process ("terminate called without an active exception") after the work is done.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return student


if __name__ == "__main__":
    main()
