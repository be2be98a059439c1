import json

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from PIL import Image
from torch.utils.data import DataLoader

from copatch.callbacks.overlay_writer import OverlayWriter
from copatch.callbacks.prediction_writer import PredictionWriter
from copatch.datamodules.refer import ReferDataModule, ReferDataset
from copatch.masks import decode_rle
from copatch.module import CoPatch
from copatch.proposals import GroundTruthProposals
from copatch.overlay import contour, display_scale
from copatch.types import Prediction


def test_writers_round_trip_masks_and_draw_overlays(tiny_config, toy_root, tmp_path):
    torch.manual_seed(0)
    model = CoPatch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128, proposer=GroundTruthProposals())
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
    scale = display_scale(h, w)  # the documented size of render_overlay: (2 s W) x (s H + band)
    picture = Image.open(tmp_path / "overlays" / f"{first.expressions[0].id}.png")
    assert picture.width == 2 * scale * w and picture.height > scale * h


def test_contour_is_the_inner_boundary():
    mask = np.zeros((5, 5), dtype=bool)
    mask[1:4, 1:4] = True
    expected = mask.copy()
    expected[2, 2] = False
    assert (contour(mask) == expected).all()


WRITER = "copatch.callbacks.prediction_writer.PredictionWriter"


def test_png_masks_from_the_command_line_with_one_writer_and_metrics_on_stdout(tiny_run_config, tmp_path, capsys):
    import json
    import stat
    from collections import Counter

    import numpy as np

    from copatch.cli import main
    from copatch.run_state import read_predictions

    out = tmp_path / "run"
    # The config already has a PredictionWriter: the one added here only sets png, and is merged into it.
    assert main(["predict", "--config", str(tiny_run_config), "--trainer.default_root_dir", str(out),
                 f"--trainer.callbacks+={WRITER}", "--trainer.callbacks.png", "true"]) == 0
    printed = capsys.readouterr()
    assert "CoPatch results" in printed.out and "CoPatch results" not in printed.err
    lines = read_predictions(out)
    assert set(Counter(line["id"] for line in lines).values()) == {1}  # no line written twice
    pngs = sorted((out / "masks").glob("*.png"))
    assert sorted(p.stem for p in pngs) == sorted(str(line["id"]) for line in lines)
    for line in lines[:5]:  # each PNG is the line's mask
        h, w = line["mask"]["size"]
        png = np.array(Image.open(out / "masks" / f"{line['id']}.png")) > 0
        assert (png == decode_rle([line["mask"]], h, w)[0].numpy()).all()
    assert {stat.S_IMODE(p.stat().st_mode) for p in pngs} == {stat.S_IMODE((out / "run.json").stat().st_mode)}
    # `copatch evaluate` prints the metrics to the same stream.
    assert main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr()
    assert "CoPatch results" in printed.out and "CoPatch results" not in printed.err
    assert json.loads((out / "metrics.json").read_text())["expressions"] == len(lines)


def test_two_writers_on_different_dirs_are_refused(tiny_run_config, tmp_path, capsys):
    out = tmp_path / "run"
    from copatch.cli import main

    code = main(["predict", "--config", str(tiny_run_config), "--trainer.default_root_dir", str(out),
                 f"--trainer.callbacks+={WRITER}", "--trainer.callbacks.output_dir", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert code != 0 and "two PredictionWriter callbacks write to different dirs" in err and str(out) in err
    assert not (tmp_path / "other").exists() and not list(out.glob("predictions*"))


class _CountsModule(LightningModule):
    """Not a CoPatch: a module with `skip_ids` / `run_dir` (so the writer resumes it) whose predictions
    carry fixed pixel counts; its own `on_predict_epoch_end` records the `results` it finds set."""

    COUNTS = {"a": (2, 4), "b": (3, 3), "c": (0, 5)}  # id -> (inter, union)

    def __init__(self) -> None:
        super().__init__()
        self.skip_ids: set[str] = set()
        self.run_dir = None
        self.results: dict[str, float] = {}
        self.seen: dict[str, float] | None = None

    def predict_step(self, batch: list[str], batch_idx: int = 0) -> list[Prediction]:
        out = []
        for key in batch:
            inter, union = self.COUNTS[key]
            out.append(Prediction(key, 0, key, torch.zeros(2, 3, dtype=torch.bool), 0, [0], [1.0],
                                  torch.zeros(0, 1, 1, dtype=torch.bool), iou=inter / union, inter=inter, union=union))
        return out

    def describe(self) -> dict:
        return {"who": "counts"}

    def on_predict_epoch_end(self) -> None:
        self.seen = dict(self.results)


def test_writer_sets_results_from_the_lines_before_the_module_hook(tmp_path):
    model = _CountsModule()
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                      callbacks=[PredictionWriter(with_masks=False)])
    loader = DataLoader(list(_CountsModule.COUNTS), batch_size=2, collate_fn=list)
    trainer.predict(model, loader, return_predictions=False)
    inter, union = np.array(list(_CountsModule.COUNTS.values())).T
    assert model.seen is not None and model.seen == model.results  # set before the module's own hook ran
    assert model.results["n"] == 3
    assert model.results["oIoU"] == pytest.approx(100 * inter.sum() / union.sum())
    assert model.results["mIoU"] == pytest.approx(100 * (inter / union).mean())
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["setup"] == {"who": "counts"} and written["metrics"] == model.results
