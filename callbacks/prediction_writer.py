"""`PredictionWriter`: one JSON line per expression, written per batch and per rank.

Each rank appends to its own `predictions.rank<R>.jsonl` under the output dir (the trainer's
`default_root_dir` unless given), flushed after every batch, so nothing collides across GPUs and
`return_predictions=False` loses nothing. A line holds the expression id, the expression, the chosen
proposal, the candidates and their scores, the IoU when the ground truth is known, and the chosen mask
as a compressed COCO RLE (`{"size": [H, W], "counts": str}`).

With `png=True` every chosen mask is also written as `<output_dir>/masks/<id>.png`, a binary
(0/255) PNG at the image's size: the layout PhraseCut's official evaluator reads (`<task_id>.png`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from copatch.masks import encode_rle
from copatch.types import Prediction


def prediction_record(pred: Prediction, with_mask: bool = True) -> dict[str, Any]:
    """A JSON-ready dict of one prediction."""
    record = {"id": pred.expression_id, "image_id": pred.image_id, "text": pred.text, "chosen": pred.chosen,
              "candidates": pred.candidates, "candidate_scores": pred.candidate_scores, "iou": pred.iou,
              "oracle_iou": pred.oracle_iou, **pred.extras}
    if with_mask:
        record["mask"] = encode_rle(pred.mask[None].cpu())[0]
    return record


class PredictionWriter(BasePredictionWriter):
    """Writes every prediction as a JSON line, per batch, one file per rank.

    Args:
        output_dir: where to write; defaults to the trainer's `default_root_dir`.
        with_masks: store the chosen mask as COCO RLE (needed to re-evaluate from disk).
        png: also write each chosen mask as `masks/<id>.png`.
    """

    def __init__(self, output_dir: str | None = None, with_masks: bool = True, png: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.with_masks = with_masks
        self.png = png

    def root(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir or trainer.default_root_dir)

    def path(self, trainer: pl.Trainer) -> Path:
        return self.root(trainer) / f"predictions.rank{trainer.global_rank}.jsonl"

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")  # a fresh run starts a fresh file

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: list[Prediction],
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        with self.path(trainer).open("a") as f:
            for pred in prediction:
                f.write(json.dumps(prediction_record(pred, self.with_masks)) + "\n")
            f.flush()
        if self.png:
            masks = self.root(trainer) / "masks"
            masks.mkdir(parents=True, exist_ok=True)
            for pred in prediction:
                pixels = pred.mask.cpu().numpy().astype(np.uint8) * 255
                Image.fromarray(pixels).save(masks / f"{pred.expression_id}.png")
