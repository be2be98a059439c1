import json

import numpy as np
import torch
from lightning.pytorch import Trainer
from PIL import Image

from copatch.callbacks.overlay_writer import OverlayWriter
from copatch.callbacks.prediction_writer import PredictionWriter
from copatch.datamodules.refer import ReferDataModule, ReferDataset
from copatch.masks import decode_rle
from copatch.module import CoPatch
from copatch.overlay import contour


def test_writers_round_trip_masks_and_draw_overlays(tiny_config, toy_root, tmp_path):
    torch.manual_seed(0)
    model = CoPatch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                      callbacks=[PredictionWriter(png=True), OverlayWriter(limit=3)])
    dm = ReferDataModule(str(toy_root), split="val", batch_size=2)
    preds = {p.expression_id: p for b in trainer.predict(model, datamodule=dm) for p in b}
    lines = [json.loads(x) for x in (tmp_path / "predictions.rank0.jsonl").read_text().splitlines()]
    assert len(lines) == len(preds)
    for line in lines:
        h, w = line["mask"]["size"]
        assert torch.equal(decode_rle([line["mask"]], h, w)[0], preds[line["id"]].mask)
        png = np.asarray(Image.open(tmp_path / "masks" / f"{line['id']}.png"))
        assert png.shape == (h, w) and np.array_equal(png > 0, preds[line["id"]].mask.numpy())
    pictures = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(pictures) == 3
    first = ReferDataset(str(toy_root), split="val")[0]
    h, w = first.size
    assert Image.open(tmp_path / "overlays" / f"{first.expressions[0].id}.png").size == (2 * w, h + 18)


def test_contour_is_the_inner_boundary():
    mask = np.zeros((5, 5), dtype=bool)
    mask[1:4, 1:4] = True
    expected = mask.copy()
    expected[2, 2] = False
    assert (contour(mask) == expected).all()
