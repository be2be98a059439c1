"""Tests of `copatch.metrics` against an independent NumPy reference, including a 2-rank DDP run.

Run as a script (`python test_metrics.py RANK PORT OUT`), this file is one rank of the DDP test: a
subprocess per rank avoids pickling test functions, which `--import-mode=importlib` makes
unimportable in `torch.multiprocessing.spawn` children.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from copatch.metrics import MeanScore, RISMetric, intersection_union

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
SIZES = [(1, 1), (5, 7), (16, 16), (23, 9)]


def _samples(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` (pred, target) pairs of assorted sizes, with empty preds, targets and unions."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        target = torch.rand(h, w, generator=gen) < 0.5
        pred = target ^ (torch.rand(h, w, generator=gen) < 0.2 * (i % 4))  # some exact hits
        if i % 7 == 3:
            pred = torch.zeros_like(pred)
        if i % 7 == 5:
            target = torch.zeros_like(target)
        if i % 11 == 6:
            pred, target = torch.zeros_like(pred), torch.zeros_like(target)
        out.append((pred, target))
    return out


def _numpy_reference(samples, thresholds=THRESHOLDS) -> dict[str, float]:
    inters, unions, ious = [], [], []
    for pred, target in samples:
        p, t = pred.numpy(), target.numpy()
        i, u = int(np.logical_and(p, t).sum()), int(np.logical_or(p, t).sum())
        inters.append(i)
        unions.append(u)
        ious.append(i / u if u else 0.0)
    ious_np = np.asarray(ious)
    out = {"oIoU": 100 * sum(inters) / sum(unions), "mIoU": 100 * ious_np.mean()}
    for t in thresholds:
        out[f"Pr@{t:g}"] = 100 * (ious_np >= t).mean()
    out["n"] = len(samples)
    return out


def _assert_matches(result: dict[str, torch.Tensor], ref: dict[str, float]) -> None:
    assert list(result) == list(ref)
    for key, value in ref.items():
        assert result[key].item() == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert result["oIoU"].dtype == torch.float64 and result["n"].dtype == torch.int64


def test_functional_intersection_union() -> None:
    pred = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    target = torch.tensor([[[1, 0], [1, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    inter, union = intersection_union(pred, target)
    assert inter.tolist() == [1, 0] and union.tolist() == [3, 0] and inter.dtype == torch.int64
    inter, union = intersection_union(pred[0], target[0])
    assert inter.tolist() == [1] and union.tolist() == [3]
    with pytest.raises(ValueError, match=r"\(2, 2, 2\).*\(2, 4, 4\).*original image"):
        intersection_union(pred, torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(TypeError):
        intersection_union(pred.float(), target)


def test_matches_numpy_reference_list_and_stacked_updates() -> None:
    samples = _samples(0, 40)
    metric = RISMetric()
    metric.update([p for p, _ in samples[:10]], [t for _, t in samples[:10]])
    for h, w in SIZES:  # stacked [E, H, W] updates, one size at a time
        same = [(p, t) for p, t in samples[10:] if p.shape == (h, w)]
        metric.update(torch.stack([p for p, _ in same]), torch.stack([t for _, t in same]))
    _assert_matches(metric.compute(), _numpy_reference(samples[:10] + [
        (p, t) for h, w in SIZES for p, t in samples[10:] if p.shape == (h, w)
    ]))


def test_threshold_ties_use_greater_equal() -> None:
    # IoU exactly 1/2, 3/5, 7/10, 4/5, 9/10 and 1: each hits its own threshold.
    metric = RISMetric()
    for i, u in [(1, 2), (3, 5), (7, 10), (4, 5), (9, 10), (10, 10)]:
        pred = torch.zeros(1, 1, u, dtype=torch.bool)
        pred[..., :u] = True
        target = torch.zeros_like(pred)
        target[..., :i] = True
        metric.update(pred, target)
    out = metric.compute()
    assert [out[f"Pr@{t:g}"].item() for t in THRESHOLDS] == pytest.approx(
        [100 * k / 6 for k in (6, 5, 4, 3, 2)]
    )


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_union_zero_counts_as_zero_and_empty_metric() -> None:
    metric = RISMetric()
    assert metric.compute()["n"].item() == 0 and torch.isnan(metric.compute()["mIoU"])
    metric.update(torch.zeros(3, 4, 4, dtype=torch.bool), torch.zeros(3, 4, 4, dtype=torch.bool))
    out = metric.compute()
    assert out["n"].item() == 3 and out["oIoU"].item() == 0 and out["mIoU"].item() == 0
    assert out["Pr@0.5"].item() == 0


def test_custom_thresholds_and_reset() -> None:
    samples = _samples(1, 12)
    metric = RISMetric(thresholds=(0.3, 0.5, 0.7, 0.9))
    metric.update([p for p, _ in samples], [t for _, t in samples])
    metric.reset()
    assert metric.num_samples.item() == 0 and metric.hits.tolist() == [0, 0, 0, 0]
    metric.update([p for p, _ in samples], [t for _, t in samples])
    _assert_matches(metric.compute(), _numpy_reference(samples, (0.3, 0.5, 0.7, 0.9)))


def test_int64_states_do_not_overflow() -> None:
    # Counts as a 4000x4000 split of ~200 images would give; sums pass 2**31 and 2**32.
    metric = RISMetric()
    inter = torch.full((300,), 2**24 - 5, dtype=torch.int64)
    union = torch.full((300,), 2**24, dtype=torch.int64)
    metric.update(intersection=inter, union=union)
    assert metric.union_sum.item() == 300 * 2**24 and metric.union_sum.dtype == torch.int64
    assert metric.compute()["oIoU"].item() == pytest.approx(100 * (2**24 - 5) / 2**24, rel=1e-15)
    # A later update is seen (no stale compute cache).
    metric.update(intersection=torch.tensor([2**40]), union=torch.tensor([2**40]))
    out = metric.compute()
    assert out["n"].item() == 301
    assert out["mIoU"].item() == pytest.approx(100 * (300 * (1 - 5 / 2**24) + 1) / 301)
    metric.update_counts(torch.tensor([0]), torch.tensor([0]))  # the alias, also not stale
    assert metric.compute()["n"].item() == 302
    with pytest.raises(ValueError, match="either"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.bool), intersection=inter, union=union)
    # The mask path counts in int64 too.
    full = torch.ones(1, 3000, 3000, dtype=torch.bool)
    inter, union = intersection_union(full, full)
    assert inter.dtype == torch.int64 and union.item() == 9_000_000


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_mean_score() -> None:
    metric = MeanScore()
    assert torch.isnan(metric.compute())
    metric.update(torch.tensor([0.25, 1.0]))
    metric.update(0.5)
    metric.update([0.0, 0.75])
    assert metric.compute().item() == pytest.approx(0.5) and metric.compute().dtype == torch.float64
    metric.reset()
    assert metric.count.item() == 0


# --- DDP: two gloo ranks with uneven shares must give exactly the single-process result. ---

_DDP_SAMPLES = 19  # rank 0 takes 12 of them, rank 1 takes 7
_SPLIT = 12


def _ddp_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    samples = _samples(5, _DDP_SAMPLES)
    mine = samples[:_SPLIT] if rank == 0 else samples[_SPLIT:]
    ris, mean = RISMetric(), MeanScore()
    for pred, target in mine:  # one update per sample: uneven update counts per rank too
        ris.update([pred], [target])
        mean.update(float(pred.sum()))
    result = {k: v.item() for k, v in ris.compute().items()}  # compute() all-reduces the states
    result["mean"] = mean.compute().item()
    Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_uneven_equals_single_process(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(port), str(tmp_path / f"rank{rank}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    try:
        logs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), logs

    samples = _samples(5, _DDP_SAMPLES)
    single = RISMetric()
    single.update([p for p, _ in samples], [t for _, t in samples])
    expected = {k: v.item() for k, v in single.compute().items()}
    expected["mean"] = float(np.mean([float(p.sum()) for p, _ in samples]))
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == pytest.approx(expected, rel=1e-12), rank
        assert got["n"] == _DDP_SAMPLES
        # Integer sums: exactly equal, not just close.
        assert got["oIoU"] == expected["oIoU"] and got["Pr@0.5"] == expected["Pr@0.5"]


if __name__ == "__main__":
    _ddp_rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
