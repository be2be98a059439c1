"""Referring-segmentation metrics: oIoU, mIoU and Pr@X, as LAVT defines them.

Every expression is one sample. For a prediction `P` and ground truth `G` at the *original image
resolution*: `I = |P & G|`, `U = |P | G|`, `IoU = I / U`, and `IoU = 0` when `U = 0`.

- oIoU (overall, cumulative, "cIoU"): `sum(I) / sum(U)`;
- mIoU (mean, "gIoU"): `mean(IoU)`;
- Pr@X: the fraction of samples with `IoU >= X` (LAVT compares with `>=`).

All three are reported in percent. Every state is a sum (`dist_reduce_fx="sum"`), so a DDP sync is
one all-reduce per state and the result does not depend on how samples are split across ranks.
Counts are int64 (no overflow on large splits) and the IoU sum is float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


def _as_bool(mask: Tensor, name: str) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        # A float mask may be a probability map; thresholding it here would hide a choice.
        raise TypeError(f"{name} must be a bool (or 0/1 integer) mask, got dtype {mask.dtype}")
    return mask != 0


def intersection_union(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample intersection and union pixel counts.

    Args:
        pred: `[E, H, W]` (or `[H, W]`) bool predicted masks.
        target: ground truth of the same shape.

    Returns:
        `(I, U)`, each `[E]` int64 (`[1]` for a single `[H, W]` pair).
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} differs from ground-truth shape "
            f"{tuple(target.shape)}: the prediction must be at the ground truth's (original image) "
            "resolution"
        )
    pred, target = _as_bool(pred, "pred"), _as_bool(target, "target")
    if pred.ndim == 2:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    if pred.ndim != 3:
        raise ValueError(f"expected [E, H, W] or [H, W] masks, got shape {tuple(pred.shape)}")
    pred, target = pred.flatten(1), target.flatten(1)
    # A bool sum is int64 in torch, so no overflow for any image size.
    return (pred & target).sum(1), (pred | target).sum(1)


def iou_from_counts(intersection: Tensor, union: Tensor) -> Tensor:
    """`I / U` in float64, 0 where `U == 0` (both `[E]`)."""
    union_f = union.double()
    return torch.where(union > 0, intersection.double() / union_f.clamp_min(1), 0.0)


class RISMetric(Metric):
    """oIoU, mIoU and Pr@X over referring expressions, in percent.

    Args:
        thresholds: the IoU thresholds X of Pr@X (a sample counts when `IoU >= X`).
        kwargs: passed to `torchmetrics.Metric`.

    `compute()` returns a dict of float64 scalars: `"oIoU"`, `"mIoU"`, `"Pr@0.5"`, ... (percent) and
    `"n"` (the sample count, int64). With no samples every score is NaN. If every sample has an
    empty union, oIoU is 0 (as each per-sample IoU is).

    Example:
        >>> import torch
        >>> metric = RISMetric(thresholds=(0.5,))
        >>> pred = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
        >>> target = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 1]]], dtype=torch.bool)
        >>> metric.update(pred, target)
        >>> out = metric.compute()
        >>> round(out["oIoU"].item(), 2), out["mIoU"].item(), out["Pr@0.5"].item(), out["n"].item()
        (33.33, 25.0, 50.0, 2)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    intersection_sum: Tensor
    union_sum: Tensor
    iou_sum: Tensor
    num_samples: Tensor
    hits: Tensor

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.thresholds = tuple(float(t) for t in thresholds)
        i64 = torch.int64
        self.add_state("intersection_sum", torch.zeros((), dtype=i64), dist_reduce_fx="sum")
        self.add_state("union_sum", torch.zeros((), dtype=i64), dist_reduce_fx="sum")
        self.add_state("iou_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.zeros((), dtype=i64), dist_reduce_fx="sum")
        self.add_state("hits", torch.zeros(len(self.thresholds), dtype=i64), dist_reduce_fx="sum")

    def update(
        self,
        pred: Tensor | Sequence[Tensor] | None = None,
        target: Tensor | Sequence[Tensor] | None = None,
        *,
        intersection: Tensor | None = None,
        union: Tensor | None = None,
    ) -> None:
        """Add samples, from masks or from precomputed pixel counts.

        Args:
            pred: `[E, H, W]` bool, or a sequence of `E` `[H_i, W_i]` bool masks (sizes may differ).
            target: the ground truth, in the same form and at the same resolutions.
            intersection, union: instead of masks, per-sample `I` and `U` (`[E]` integers), e.g.
                when the caller has already counted them. Counts go through `update` (not a separate
                method) so torchmetrics' update bookkeeping and compute cache stay right.
        """
        if intersection is not None or union is not None:
            if intersection is None or union is None or pred is not None or target is not None:
                raise ValueError("pass either pred and target, or intersection and union")
            self._add_counts(intersection, union)
            return
        if pred is None or target is None:
            raise ValueError("pass either pred and target, or intersection and union")
        if isinstance(pred, Tensor) and isinstance(target, Tensor):
            inter, uni = intersection_union(pred, target)
        else:
            if len(pred) != len(target):
                raise ValueError(f"got {len(pred)} predictions but {len(target)} ground truths")
            pairs = [intersection_union(p, t) for p, t in zip(pred, target)]
            if not pairs:
                return
            inter = torch.cat([i.to(self.union_sum.device) for i, _ in pairs])
            uni = torch.cat([u.to(self.union_sum.device) for _, u in pairs])
        self._add_counts(inter, uni)

    def update_counts(self, intersection: Tensor, union: Tensor) -> None:
        """Same as `update(intersection=..., union=...)`: per-sample `I`, `U` (`[E]` integers)."""
        # Through the wrapped `self.update`, so the compute cache is invalidated and counted.
        self.update(intersection=intersection, union=union)

    def _add_counts(self, intersection: Tensor, union: Tensor) -> None:
        device = self.union_sum.device
        inter = intersection.reshape(-1).to(device=device, dtype=torch.int64)
        union = union.reshape(-1).to(device=device, dtype=torch.int64)
        if inter.shape != union.shape:
            raise ValueError(f"{inter.numel()} intersections but {union.numel()} unions")
        iou = iou_from_counts(inter, union)
        thr = torch.tensor(self.thresholds, dtype=torch.float64, device=device)
        self.intersection_sum += inter.sum()
        self.union_sum += union.sum()
        self.iou_sum += iou.sum()
        self.num_samples += iou.numel()
        self.hits += (iou[:, None] >= thr[None, :]).sum(0)

    def compute(self) -> dict[str, Tensor]:
        """`{"oIoU", "mIoU", "Pr@X"...: float64 percent, "n": int64}`."""
        n = self.num_samples.double()
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=n.device)
        if self.num_samples == 0:
            o_iou = m_iou = nan
            prec = nan.expand(len(self.thresholds))
        else:
            o_iou = iou_from_counts(self.intersection_sum, self.union_sum) * 100
            m_iou = self.iou_sum / n * 100
            prec = self.hits.double() / n * 100
        out = {"oIoU": o_iou, "mIoU": m_iou}
        out.update({f"Pr@{t:g}": prec[j] for j, t in enumerate(self.thresholds)})
        out["n"] = self.num_samples.clone()
        return out


class MeanScore(Metric):
    """Mean of a per-expression quantity (e.g. the top-3 oracle IoU): float64 sum / int64 count.

    A separate metric rather than an extra entry point on `RISMetric`, so that each metric has one
    meaning and can be logged on its own. `update` takes a tensor (any shape: each element is one
    sample), a float, or a sequence of floats. `compute()` is NaN with no samples; NaN samples
    propagate. Multiply by 100 yourself if the quantity is an IoU and you want percent.

    Example:
        >>> m = MeanScore()
        >>> m.update(torch.tensor([0.5, 1.0]))
        >>> m.update(0.0)
        >>> m.compute().item()
        0.5
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    total: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, value: Tensor | float | Sequence[float]) -> None:
        """Add one sample per element of `value`."""
        values = torch.as_tensor(value, dtype=torch.float64, device=self.total.device).reshape(-1)
        self.total += values.sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        """The mean, float64 scalar."""
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.total.device)
        return self.total / self.count
