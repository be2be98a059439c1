"""`copatch evaluate OUTPUT_DIR`: the metrics of a run, recomputed from its prediction files.

Every prediction line carries the pixel counts of its chosen mask against the ground truth
(`inter` = |P & G|, `union` = |P | G|) and those of the top-k oracle, so the metrics follow exactly
from the lines, whatever the number of ranks or interruptions that wrote them: the lines of all
`predictions.rank*.jsonl` are read (a torn last line is dropped), reduced to the final line of each
expression (`copatch.run_state.final_lines`), put in id order and summed with
`RISMetric.update_counts`. This is also how a run that writes predictions makes its `metrics.json`,
so a resumed run reports the metrics of all its expressions.

With `--ground-truth` the counts are not trusted: each line's mask (COCO RLE) is decoded and
compared with the dataset's ground truth, the dataset being rebuilt from the run's `run.json`; lines
whose counts disagree and expressions of the split without a line are reported.

`failures.jsonl` lists exactly the final lines that failed (the number `metrics.json` gives as
`failures`). The prediction files are only read here, never compacted: a run may be appending to them.
The metrics are printed to stdout, as at the end of `copatch predict`.

    copatch evaluate outputs/refcoco-val
    copatch evaluate outputs/refcoco-val --ground-truth
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from copatch.failures import failure_line, summary
from copatch.metrics import RISMetric
from copatch.run_state import (FAILURES_FILE, METRICS_FILE, atomic_write_text, final_lines, id_key,
                               prediction_files, read_predictions, read_run)


@dataclass
class Evaluation:
    """The outcome of evaluating an output dir.

    Attributes:
        metrics: oIoU, mIoU, Pr@X, n, oracle_oIoU, oracle_mIoU (percent; empty without ground truth).
        expressions: how many distinct expressions have a line.
        failures: the `failures.jsonl` lines of the expressions that could not be evaluated.
        mismatches: (`ground_truth` only) `id: written -> recomputed` for counts that disagree.
        missing: (`ground_truth` only) ids of the split that have no line yet.
    """

    metrics: dict[str, float]
    expressions: int
    failures: list[dict[str, Any]]
    mismatches: list[str] = field(default_factory=list)
    missing: list[Any] = field(default_factory=list)
    oracle: bool = False  # the proposals were the ground truth's own masks (GroundTruthProposals)


def _order(record: dict[str, Any]) -> tuple[int, Any]:
    value = record["id"]
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def metrics_from_lines(lines: list[dict[str, Any]]) -> dict[str, float]:
    """The module's metrics from deduplicated lines, summed in id order (so the result does not
    depend on which rank or run wrote which line). Lines without ground truth are not counted."""
    counted = sorted((r for r in lines if r.get("inter") is not None), key=_order)
    if not counted:
        return {}
    # Local sums only: under DDP this runs on rank 0 alone, and a sync would wait for the other ranks.
    metric, oracle = RISMetric(sync_on_compute=False), RISMetric(sync_on_compute=False)
    metric.update_counts(torch.tensor([r["inter"] for r in counted]), torch.tensor([r["union"] for r in counted]))
    results = {k: float(v) for k, v in metric.compute().items()}
    with_oracle = [r for r in counted if r.get("oracle_inter") is not None]
    if with_oracle:
        oracle.update_counts(torch.tensor([r["oracle_inter"] for r in with_oracle]),
                             torch.tensor([r["oracle_union"] for r in with_oracle]))
        results.update({f"oracle_{k}": float(v) for k, v in oracle.compute().items() if k in ("oIoU", "mIoU")})
    return results


ORACLE_LABEL = "ORACLE (ground-truth proposals: the dataset's own masks; not CoPatch's score)"


def is_oracle_setup(setup: dict[str, Any] | None) -> bool:
    """Whether a run's `setup` (`CoPatch.describe()`, or the fingerprint in run.json) used the oracle
    proposer `GroundTruthProposals`."""
    if not setup:
        return False
    if "oracle" in setup:
        return bool(setup["oracle"])
    proposer = setup.get("proposer")
    name = proposer.get("class", "") if isinstance(proposer, dict) else str(proposer or "")
    return name.rsplit(".", 1)[-1] == "GroundTruthProposals"


# Where `show_results` sends a report: None prints it at once; a list collects it, so a command can
# print it after the progress bar has finished drawing (`copatch predict` does).
_HELD_REPORTS: list[str] | None = None


def show_results(text: str) -> None:
    """Print a results report to stdout (as `copatch evaluate` does), or hold it (`hold_results`)."""
    if _HELD_REPORTS is not None:
        _HELD_REPORTS.append(text)
    else:
        print(text, flush=True)


def hold_results(hold: bool) -> list[str]:
    """Start (`True`) or stop (`False`) holding the reports of `show_results`; returns those held."""
    global _HELD_REPORTS
    held, _HELD_REPORTS = (_HELD_REPORTS or []), ([] if hold else None)
    return held


def format_results(results: dict[str, float], oracle: bool = False) -> str:
    """A small text table of the metrics; `oracle` puts the oracle label in its title line."""
    rows = [f"{k:>12}  {v:8.2f}" if k != "n" else f"{k:>12}  {int(v):8d}" for k, v in results.items()]
    title = f"CoPatch results, {ORACLE_LABEL}" if oracle else "CoPatch results"
    return title + "\n" + "\n".join(rows)


def evaluate_run(root: str | os.PathLike, setup: dict[str, Any] | None = None, write: bool = True,
                 ground_truth: bool = False) -> Evaluation:
    """Metrics and failures of the output dir `root` from its prediction lines.

    Args:
        root: the output dir (holding `predictions.rank*.jsonl`).
        setup: what to record as `setup` in `metrics.json` (default: the fingerprint in `run.json`).
        write: write `metrics.json` and `failures.jsonl` (removed when nothing failed) into `root`.
        ground_truth: recompute each line's counts from its mask and the dataset's ground truth.
    """
    root = Path(root)
    if not prediction_files(root):
        raise FileNotFoundError(f"no predictions.rank*.jsonl in {root}: give the output dir of a `copatch predict` "
                                "run (its --trainer.default_root_dir) that used the PredictionWriter callback.")
    run = read_run(root)
    records = sorted(final_lines(read_predictions(root)).values(), key=_order)
    mismatches: list[str] = []
    missing: list[Any] = []
    if ground_truth:
        records, mismatches, missing = _recheck(root, run, records)
    metrics = metrics_from_lines(records)
    failures = [failure_line(r) for r in records if r.get("failure")]
    if write:
        if metrics:
            if setup is None:
                setup = dict((run or {}).get("fingerprint", {}))
                setup["oracle"] = is_oracle_setup(setup)
            atomic_write_text(root / METRICS_FILE, json.dumps(
                {"metrics": metrics, "setup": setup, "expressions": len(records), "failures": len(failures)},
                indent=2) + "\n")
        if failures:
            atomic_write_text(root / FAILURES_FILE, "".join(json.dumps(f) + "\n" for f in failures))
        elif (root / FAILURES_FILE).exists():  # all earlier failures were retried successfully
            (root / FAILURES_FILE).unlink()
    oracle = is_oracle_setup(setup if setup is not None else (run or {}).get("fingerprint"))
    return Evaluation(metrics, len(records), failures, mismatches, missing, oracle)


@contextlib.contextmanager
def _working_dir(path: str | None) -> Iterator[None]:
    # The run's relative data paths are relative to where it was started.
    old = os.getcwd()
    if path and os.path.isdir(path):
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _build_dataset(run: dict[str, Any]) -> Any:
    meta = run.get("meta", {})
    class_path, hparams = meta.get("data_class"), meta.get("data_hparams")
    if not class_path or hparams is None:
        raise ValueError("run.json names no DataModule, so the ground truth is unknown")
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    params = inspect.signature(cls.__init__).parameters
    dm = cls(**{k: v for k, v in hparams.items() if k in params})
    dm.prepare_data()
    dm.setup("predict")
    return dm.predict_dataloader().dataset


def _recheck(root: Path, run: dict[str, Any] | None, records: list[dict[str, Any]]
             ) -> tuple[list[dict[str, Any]], list[str], list[Any]]:
    from copatch.masks import decode_rle
    from copatch.metrics import intersection_union

    if run is None:
        raise FileNotFoundError(f"{root} has no run.json, so its dataset is unknown: --ground-truth needs it.")
    by_id = {id_key(r["id"]): dict(r) for r in records}
    mismatches, missing, seen = [], [], set()
    with _working_dir(run.get("meta", {}).get("cwd")):
        dataset = _build_dataset(run)
        for index in range(len(dataset)):
            sample = dataset[index]
            if sample.targets is None:
                raise ValueError(f"the dataset of {root} has no ground truth")
            for expr, target in zip(sample.expressions, sample.targets):
                record = by_id.get(id_key(expr.id))
                if record is None:
                    missing.append(expr.id)
                    continue
                seen.add(id_key(expr.id))
                if "mask" not in record or record["mask"] is None:
                    raise ValueError(f"the line of expression {expr.id!r} in {root} has no mask: --ground-truth needs "
                                     "predictions written with PredictionWriter(with_masks=true).")
                h, w = record["mask"]["size"]
                mask = decode_rle([record["mask"]], h, w)[0]
                inter, union = (int(v) for v in intersection_union(mask, target.bool()))
                written = (record.get("inter"), record.get("union"))
                if (inter, union) != written:
                    mismatches.append(f"{expr.id}: {written} -> {(inter, union)}")
                record["inter"], record["union"] = inter, union
    unknown = sorted(set(by_id) - seen)
    if unknown:
        raise ValueError(f"{len(unknown)} lines in {root} name expressions that are not in the run's dataset "
                         f"(e.g. {unknown[:5]}): the predictions come from another split or dataset.")
    return sorted(by_id.values(), key=_order), mismatches, missing


def report(evaluation: Evaluation, root: str | os.PathLike) -> str:
    """The text printed at the end of a run and by `copatch evaluate`."""
    parts = []
    if evaluation.metrics:
        parts.append(format_results(evaluation.metrics, oracle=evaluation.oracle))
    else:
        parts.append(f"{evaluation.expressions} expressions written; no ground truth, so no metrics.")
    text = summary(evaluation.failures, evaluation.expressions, str(Path(root) / FAILURES_FILE))
    if text:
        parts.append(text)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """`copatch evaluate OUTPUT_DIR [--ground-truth] [--no-write]`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="copatch evaluate",
        description="Recompute oIoU / mIoU / Pr@X (and the top-k oracle) of a `copatch predict` output dir from its "
                    "predictions.rank*.jsonl, and write metrics.json and failures.jsonl there.")
    parser.add_argument("output_dir", help="the run's --trainer.default_root_dir")
    parser.add_argument("--ground-truth", action="store_true",
                        help="recompute every count from the written mask and the dataset's ground truth (the "
                             "dataset named in run.json is loaded); report disagreements and expressions with no line")
    parser.add_argument("--no-write", action="store_true", help="only print; leave metrics.json as it is")
    args = parser.parse_args(argv)
    try:
        evaluation = evaluate_run(args.output_dir, write=not args.no_write, ground_truth=args.ground_truth)
    except (FileNotFoundError, ValueError) as err:
        print(f"copatch evaluate: error: {err}", file=sys.stderr)
        return 2
    print(report(evaluation, args.output_dir))
    status = 0
    if args.ground_truth:
        if evaluation.missing:
            print(f"{len(evaluation.missing)} expressions of the split have no prediction yet (e.g. "
                  f"{evaluation.missing[:5]}): the run is incomplete; rerun the same command to finish it.")
        if evaluation.mismatches:
            print(f"{len(evaluation.mismatches)} lines disagree with the ground truth (written -> recomputed): "
                  + "; ".join(evaluation.mismatches[:10]))
            status = 1
        else:
            print("Every written count agrees with the ground truth.")
    return status
