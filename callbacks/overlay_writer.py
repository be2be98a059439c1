"""`OverlayWriter`: PNG pictures of the first K predictions (or of chosen expression ids).

Each picture (`copatch.overlay.render_overlay`) shows the image with the CoMap clusters and the
ground truth, and the candidates with the chosen mask, captioned with the expression (its IoU and
`Prediction.score`) above a legend of the colours. Files are named by expression id,
`<output_dir>/overlays/<id>.png`, so ranks never collide, and written atomically.

`limit` counts every overlay in the output dir: a resumed run (or a run on several GPUs) writes only
the pictures still missing, so the folder never holds more than `limit` (see `OverlayWriter`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from copatch.overlay import render_overlay, save_png_atomic
from copatch.types import ImageSample, Prediction


class OverlayWriter(Callback):
    """Writes overlays for the first `limit` expressions of the run, or for `ids` if given.

    Args:
        output_dir: where to write; defaults to the trainer's `default_root_dir`.
        limit: how many overlays the output dir holds at most, over all ranks and over resumed runs
            (the `<id>.png` files already in `overlays/` count; ignored when `ids` is given). With
            several ranks, rank r may write `limit // world_size` pictures, plus one for the first
            `limit % world_size` ranks, of what is left.
        ids: expression ids to draw (e.g. `sent_id`s), whatever their position.
    """

    def __init__(self, output_dir: str | None = None, limit: int = 16, ids: list[int | str] | None = None) -> None:
        self.output_dir, self.limit = output_dir, limit
        self.ids = None if ids is None else {str(i) for i in ids}
        self.written = 0
        self.quota = limit
        self.existing: set[str] = set()

    def folder(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir or trainer.default_root_dir) / "overlays"

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Count what earlier runs left before any rank writes (the barrier), so that every rank sees
        # the same number and the ranks' shares add up to what is left.
        folder = self.folder(trainer)
        self.existing = {p.stem for p in folder.glob("*.png")} if folder.is_dir() else set()
        trainer.strategy.barrier("copatch-overlays-counted")
        left = max(0, self.limit - len(self.existing))
        world, rank = trainer.world_size, trainer.global_rank
        self.quota = left // world + (1 if rank < left % world else 0)
        self.written = 0

    def wanted(self, pred: Prediction) -> bool:
        if self.ids is not None:
            return str(pred.expression_id) in self.ids
        # Redrawing a picture an earlier run left (its line was lost) does not add a file.
        return str(pred.expression_id) in self.existing or self.written < self.quota

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: list[Prediction],
                             batch: list[ImageSample], batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self.folder(trainer)
        samples = {s.image_id: s for s in batch}
        for pred in outputs:
            if not self.wanted(pred):
                continue
            sample = samples[pred.image_id]
            position = [e.id for e in sample.expressions].index(pred.expression_id)
            candidates = pl_module.propose(sample).masks[pred.candidates] if pred.candidates else None
            truth = sample.targets[position] if sample.targets is not None else None
            picture = render_overlay(sample.image, pred.text, pred.mask, pred.clusters, candidates,
                                     truth=truth, iou=pred.iou, score=pred.score)
            save_png_atomic(picture, out / f"{pred.expression_id}.png")
            if str(pred.expression_id) not in self.existing:
                self.written += 1
