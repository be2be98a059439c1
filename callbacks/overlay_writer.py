"""`OverlayWriter`: PNG pictures of the first K predictions (or of chosen expression ids).

Each picture (`copatch.overlay.render_overlay`) shows the image with the CoMap clusters and the
ground truth, and the candidates with the chosen mask, captioned with the expression. Files are
named by expression id, `<output_dir>/overlays/<id>.png`, so ranks never collide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from copatch.overlay import render_overlay
from copatch.types import ImageSample, Prediction


class OverlayWriter(Callback):
    """Writes overlays for the first `limit` expressions each rank sees, or for `ids` if given.

    Args:
        output_dir: where to write; defaults to the trainer's `default_root_dir`.
        limit: how many expressions per rank get a picture (ignored when `ids` is given).
        ids: expression ids to draw (e.g. `sent_id`s), whatever their position.
    """

    def __init__(self, output_dir: str | None = None, limit: int = 16, ids: list[int | str] | None = None) -> None:
        self.output_dir, self.limit = output_dir, limit
        self.ids = None if ids is None else {str(i) for i in ids}
        self.written = 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.written = 0

    def wanted(self, pred: Prediction) -> bool:
        if self.ids is not None:
            return str(pred.expression_id) in self.ids
        return self.written < self.limit

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: list[Prediction],
                             batch: list[ImageSample], batch_idx: int, dataloader_idx: int = 0) -> None:
        out = Path(self.output_dir or trainer.default_root_dir) / "overlays"
        samples = {s.image_id: s for s in batch}
        for pred in outputs:
            if not self.wanted(pred):
                continue
            sample = samples[pred.image_id]
            position = [e.id for e in sample.expressions].index(pred.expression_id)
            candidates = pl_module.propose(sample).masks[pred.candidates] if pred.candidates else None
            truth = sample.targets[position] if sample.targets is not None else None
            picture = render_overlay(sample.image, pred.text, pred.mask, pred.clusters, candidates,
                                     truth=truth, iou=pred.iou)
            out.mkdir(parents=True, exist_ok=True)
            picture.save(out / f"{pred.expression_id}.png")
            self.written += 1
