"""`PredictionWriter`: one JSON line per expression, written per batch and per rank; resumable.

Each rank appends to its own `predictions.rank<R>.jsonl` under the output dir (the trainer's
`default_root_dir` unless given), in one write per batch followed by flush and fsync, so nothing
collides across GPUs, `return_predictions=False` loses nothing, and a killed run loses at most the
batch in flight. A line holds the expression id, the expression, the chosen proposal, the
candidates and their scores, the IoU when the ground truth is known together with its exact pixel
counts (`inter`, `union`, and `oracle_inter`, `oracle_union` for the top-k oracle), and the chosen
mask as a compressed COCO RLE (`{"size": [H, W], "counts": str}`). An expression that could not be
evaluated also carries `failure: {"kind", "file", "error"}` and is logged in `failures.rank<R>.jsonl`.

Resume: rerunning the same command with the same output dir skips every expression that already has
a line there (written by any rank of any earlier run) and computes only the rest; the metrics of the
run are then those of all lines (see `copatch.evaluate`). A dir written by another setup (model,
switches, proposer, weights, data, precision: `run.json`) is refused. See `copatch.run_state`.

With `png=True` every chosen mask is also written as `<output_dir>/masks/<id>.png`, a binary
(0/255) PNG at the image's size: the layout PhraseCut's official evaluator reads (`<task_id>.png`).

A retried expression's new line carries `attempt` (one above the last); at the end of a run the files
are compacted to one final line per expression (`copatch.run_state.final_lines`, `compact_predictions`)
by this writer's `on_predict_epoch_end`, which then sets the module's `results` from the lines and
writes `metrics.json` (Lightning runs it before the module's own hook, which only reads `results`).

One writer per run: more `PredictionWriter`s on the same output dir are merged into the first (which
then writes PNGs or masks if any of them asks for them; the others write nothing), so that adding one
on the command line to set an option (`--trainer.callbacks+=copatch.callbacks.prediction_writer.
PredictionWriter --trainer.callbacks.png true`) does not write every line twice. Writers on different
dirs are refused: a run has one output dir, the one it resumes from.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from copatch.errors import UserValueError
from copatch.evaluate import evaluate_run, report, show_results
from copatch.failures import failure_line
from copatch.masks import encode_rle
from copatch.run_state import (append_jsonl, attempts, check_run, compact_predictions, completed_ids, file_mode,
                               id_key, jsonable, read_jsonl, read_predictions, write_run)
from copatch.types import Prediction

# Settings of a DataModule that do not change any prediction (left out of the run's fingerprint).
_DATA_RUNTIME_KEYS = ("batch_size", "num_workers")


def prediction_record(pred: Prediction, with_mask: bool = True) -> dict[str, Any]:
    """A JSON-ready dict of one prediction."""
    record = {"id": pred.expression_id, "image_id": pred.image_id, "text": pred.text, "chosen": pred.chosen,
              "candidates": pred.candidates, "candidate_scores": pred.candidate_scores, "iou": pred.iou,
              "oracle_iou": pred.oracle_iou, "inter": pred.inter, "union": pred.union,
              "oracle_inter": pred.oracle_inter, "oracle_union": pred.oracle_union, "score": pred.score, **pred.extras}
    if pred.failure is not None:
        record["failure"] = pred.failure
    if with_mask:
        record["mask"] = encode_rle(pred.mask[None].cpu())[0]
    return record


def run_fingerprint(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """What defines the results of `trainer.predict(pl_module)`: the model's `fingerprint()` (or its
    hyperparameters), the DataModule's class and settings, the precision and the accelerator, and the
    copatch version. The number of devices or nodes is not part of it: a run may resume on another."""
    describe = getattr(pl_module, "fingerprint", None)
    model = describe() if callable(describe) else {"class": _class_path(pl_module),
                                                   "hparams": jsonable(dict(pl_module.hparams))}
    dm = trainer.datamodule
    data = None
    if dm is not None:
        hparams = {k: v for k, v in jsonable(dict(dm.hparams)).items() if k not in _DATA_RUNTIME_KEYS}
        data = {"class": _class_path(dm), "hparams": hparams}
    return {"copatch": _version(), "model": model, "data": data,
            "trainer": {"precision": str(trainer.precision), "accelerator": type(trainer.accelerator).__name__}}


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("copatch")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


class PredictionWriter(BasePredictionWriter):
    """Writes every prediction as a JSON line, per batch, one file per rank; resumes a killed run.

    Args:
        output_dir: where to write; defaults to the trainer's `default_root_dir`.
        with_masks: store the chosen mask as COCO RLE (needed by `copatch evaluate --ground-truth`).
        png: also write each chosen mask as `masks/<id>.png`.
    """

    def __init__(self, output_dir: str | None = None, with_masks: bool = True, png: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.with_masks = with_masks
        self.png = png
        self.merged_into: PredictionWriter | None = None  # set when another writer on the same dir writes
        self._attempts: dict[str, int] = {}  # id_key -> highest attempt already written (retried failures)

    def merge_writers(self, trainer: pl.Trainer) -> bool:
        """Make this writer the only one of the run, or find that another is; returns whether it writes.

        The first `PredictionWriter` of `trainer.callbacks` writes: it takes `png` and `with_masks` from
        every other one (any that asks for them gets them), and those become silent.

        Raises:
            UserValueError: two writers with different output dirs.
        """
        writers = [c for c in trainer.callbacks if isinstance(c, PredictionWriter)]
        first = writers[0] if writers else self
        for other in writers[1:]:
            if first.root(trainer).absolute() != other.root(trainer).absolute():
                raise UserValueError(
                    f"two PredictionWriter callbacks write to different dirs ({first.root(trainer)} and "
                    f"{other.root(trainer)}): a run has one output dir. Drop one from trainer.callbacks, or set "
                    "the dir with --trainer.default_root_dir alone.")
            first.png = first.png or other.png
            first.with_masks = first.with_masks or other.with_masks
            other.merged_into = first
        first.merged_into = None
        return self is first

    def root(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir or trainer.default_root_dir)

    def path(self, trainer: pl.Trainer) -> Path:
        return self.root(trainer) / f"predictions.rank{trainer.global_rank}.jsonl"

    def failures_path(self, trainer: pl.Trainer) -> Path:
        return self.root(trainer) / f"failures.rank{trainer.global_rank}.jsonl"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # In `setup`, before LightningCLI's SaveConfigCallback (added after the configured callbacks)
        # overwrites config.yaml: a refused run must leave the dir as it was.
        if stage != "predict" or not self.merge_writers(trainer):
            return
        root = self.root(trainer)
        root.mkdir(parents=True, exist_ok=True)
        fingerprint = run_fingerprint(trainer, pl_module)
        # Every rank checks the same run.json before anything is written, so all refuse together.
        if not check_run(root, fingerprint) and trainer.is_global_zero:
            dm = trainer.datamodule
            write_run(root, fingerprint, {
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cwd": os.getcwd(), "command": sys.argv,
                "world_size": trainer.world_size, "data_class": _class_path(dm) if dm is not None else None,
                "data_hparams": jsonable(dict(dm.hparams)) if dm is not None else None})

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.merged_into is not None:
            return
        root = self.root(trainer)
        read_jsonl(self.path(trainer), repair=True)  # drop a line torn by a kill before appending to the file
        self.path(trainer).touch()  # every rank has a file, even one that gets nothing to do
        written = read_predictions(root)  # every rank's file: the last run may have had another size
        done = completed_ids(written)
        # Only failed ids are computed again; their new lines must outrank the old ones.
        self._attempts = {k: n for k, n in attempts(written).items() if k not in done}
        if hasattr(pl_module, "skip_ids"):
            pl_module.skip_ids = done
            pl_module.run_dir = root
        if done:
            rank_zero_info(f"Resuming in {root}: {len(done)} expressions already written there are skipped "
                           "(delete the dir, or use a new --trainer.default_root_dir, to compute everything again).")

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: list[Prediction],
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if self.merged_into is not None:  # the first writer on this dir writes these lines
            return
        if self.png:  # before the line: an expression whose line exists has its PNG
            masks = self.root(trainer) / "masks"
            masks.mkdir(parents=True, exist_ok=True)
            for pred in prediction:
                pixels = pred.mask.cpu().numpy().astype(np.uint8) * 255
                _save_png_atomic(pixels, masks / f"{pred.expression_id}.png")
        records = [prediction_record(pred, self.with_masks) for pred in prediction]
        for record in records:
            record["attempt"] = self._attempts.get(id_key(record["id"]), 0) + 1
        append_jsonl(self.path(trainer), records)
        append_jsonl(self.failures_path(trainer), [failure_line(r) for r in records if r.get("failure")])

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The run's results from the written lines, set as `pl_module.results` on every rank.

        Lightning calls the callbacks' `on_predict_epoch_end` before the module's, so `CoPatch`'s own
        hook finds `results` set and only computes them from its metric states when no writer ran
        (`run_dir` None). Only for a module this writer resumes (one with `skip_ids`, given `run_dir`
        in `on_predict_start`).
        """
        super().on_predict_epoch_end(trainer, pl_module)
        root = getattr(pl_module, "run_dir", None)
        if self.merged_into is not None or root is None:
            return
        pl_module.results = self.results_from_disk(trainer, pl_module, Path(root))

    def results_from_disk(self, trainer: pl.Trainer, pl_module: pl.LightningModule, root: Path) -> dict[str, float]:
        """The metrics of every line in `root` (all ranks, and earlier runs when this one resumed),
        computed by rank 0 once every rank has written and returned to every rank.

        Rank 0 compacts the files to one final line per expression (`compact_predictions`), writes
        `metrics.json` (its `setup` is `pl_module.describe()` when there is one, else the fingerprint of
        `run.json`) and `failures.jsonl` (`copatch.evaluate.evaluate_run`) and prints
        the report as `copatch evaluate` does. An error on rank 0 is raised there and, as a RuntimeError
        naming the dir, on the other ranks, which would otherwise wait for it forever.
        """
        strategy = trainer.strategy
        strategy.barrier("copatch_predictions_written")
        payload: Any = None
        error: BaseException | None = None
        if trainer.is_global_zero:
            try:
                compact_predictions(root)  # one final line per expression; no rank writes any more
                describe = getattr(pl_module, "describe", None)
                evaluation = evaluate_run(root, setup=describe() if callable(describe) else None)
                show_results(report(evaluation, root))  # stdout, as `copatch evaluate` prints it
                payload = ("ok", evaluation.metrics)
            except Exception as err:  # every rank must reach the broadcast, or the others hang
                error, payload = err, ("error", f"{type(err).__name__}: {err}")
        payload = strategy.broadcast(payload, src=0)
        if error is not None:
            raise error
        if payload[0] == "error":
            raise RuntimeError(f"rank 0 could not compute the metrics of {root}: {payload[1]}")
        return payload[1]


def _save_png_atomic(pixels: np.ndarray, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.fchmod(fd, file_mode())  # mkstemp's 0600 would differ from every other file written
    os.close(fd)
    try:
        Image.fromarray(pixels).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
