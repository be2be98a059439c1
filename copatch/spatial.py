"""Spatial guidance (from HybridGL, as CoPatch's released code runs it): the final pick among the
candidates by a spatial-relation score (SR) and spatial coherence (SC).

SR (method-notes a.9, g.4). sigma = softmax over all N proposals of the global-local logits; for an
expression that names other nouns, sigma_neg = softmax of the logits against the mean embedding of
"a photo of <other noun>", and J = its top-6 proposals; otherwise J = the candidates themselves.
For each candidate a:

    sr_a = sum_{j in J} rel(box_a, box_j, sigma_a, s_j)        then softmax over the candidates

with rel = sigma_a (no relation word), or sigma_a * s_j * [comparison of the two boxes] for
left/right/up/down/big/small, or sigma_a * s_j * overlap / area_a for within. Comparisons are strict.
The reference passes XYXY boxes to formulas written for XYWH (`cx = x1 + x2 / 2`, `area = x2 * y2`);
`box_format="xywh"` converts them first.

SC (method-notes a.10, g.5). A GEM heat map of the noun phrase is resized to the image (bilinear,
antialiased), min-max normalised, multiplied by a direction mask (left, right, middle; up and down
are disabled in the reference) and divided by its mean. With black = 1.95 (bigger), 1.5 (smaller),
1.8 otherwise:

    sc_i = (2 - black) * mean(A over m_i) - black * mean(A outside m_i)

An empty or full mask gives NaN. The pick is `argmax((1 - alpha) * sr + alpha * sc)`; like torch's
argmax in the reference, a NaN wins (`nan_policy="wins"`), or loses with `nan_policy="loses"`.
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF

BLACK = {"big": 1.95, "small": 1.5}
BLACK_DEFAULT = 1.8
NEGATIVE_TOP_K = 6  # k2: proposals that best match the other nouns


def boxes_for_relations(boxes: torch.Tensor, box_format: str = "xyxy_as_xywh") -> torch.Tensor:
    """`[N, 4]` XYXY inclusive pixel boxes -> the `(x, y, w, h)` the relation formulas read.

    "xyxy_as_xywh" (reference) reads XYXY as XYWH unchanged; "xywh" converts (w = x2 - x1 + 1).
    """
    boxes = boxes.to(torch.float32)
    if box_format == "xyxy_as_xywh":
        return boxes
    if box_format == "xywh":
        wh = boxes[:, 2:] - boxes[:, :2] + 1
        return torch.cat([boxes[:, :2], wh], dim=1)
    raise ValueError(f"unknown box_format {box_format!r}: use 'xyxy_as_xywh' or 'xywh'")


def pairwise_relation(relation: str, box_a: torch.Tensor, box_j: torch.Tensor, s_a: torch.Tensor,
                      s_j: torch.Tensor) -> torch.Tensor:
    """`rel(box_a, box_j, s_a, s_j)` for every pair: boxes `[A, 4]`, `[J, 4]` as (x, y, w, h),
    scores `[A]`, `[J]` -> `[A, J]` float32."""
    a, j = box_a[:, None, :], box_j[None, :, :]
    both = s_a[:, None] * s_j[None, :]
    centre_x = lambda b: b[..., 0] + b[..., 2] / 2  # noqa: E731
    centre_y = lambda b: b[..., 1] + b[..., 3] / 2  # noqa: E731
    area = lambda b: b[..., 2] * b[..., 3]  # noqa: E731
    if relation == "left":
        return both * (centre_x(a) < centre_x(j))
    if relation == "right":
        return both * (centre_x(a) > centre_x(j))
    if relation == "up":
        return both * (centre_y(a) < centre_y(j))
    if relation == "down":
        return both * (centre_y(a) > centre_y(j))
    if relation == "big":
        return both * (area(a) > area(j))
    if relation == "small":
        return both * (area(a) < area(j))
    if relation == "within":
        x1 = torch.maximum(a[..., 0], j[..., 0])
        x2 = torch.maximum(x1, torch.minimum(a[..., 0] + a[..., 2], j[..., 0] + j[..., 2]))
        y1 = torch.maximum(a[..., 1], j[..., 1])
        y2 = torch.maximum(y1, torch.minimum(a[..., 1] + a[..., 3], j[..., 1] + j[..., 3]))
        return both * (x2 - x1) * (y2 - y1) / area(a)  # an empty box_a gives 0/0 = NaN, as the reference
    return s_a[:, None].expand(-1, box_j.shape[0])  # "none" or an unknown word


def relation_scores(candidates: list[int], boxes: torch.Tensor, logits: torch.Tensor, relation: str,
                    negative_logits: torch.Tensor | None = None, box_format: str = "xyxy_as_xywh") -> torch.Tensor:
    """SR over the candidates: `[C]` float32, softmaxed.

    Args:
        candidates: the C candidate proposal indices.
        boxes: `[N, 4]` XYXY inclusive boxes of all proposals.
        logits: `[N]` global-local logits (logit scale x cosine) of the expression.
        relation: the relation word group ("none", "left", ...).
        negative_logits: `[N]` logits against the other nouns, or None when the expression names none.
        box_format: see `boxes_for_relations`.
    """
    sigma = torch.softmax(logits.float(), dim=0)
    boxes = boxes_for_relations(boxes, box_format).to(sigma.device)
    cand = torch.as_tensor(candidates, device=sigma.device)
    if negative_logits is None:
        others, s_j = cand, sigma[cand]
    else:
        sigma_neg = torch.softmax(negative_logits.float(), dim=0)
        others = torch.topk(sigma_neg, k=min(NEGATIVE_TOP_K, sigma_neg.shape[0])).indices
        s_j = sigma_neg[others]
    pairs = pairwise_relation(relation, boxes[cand], boxes[others], sigma[cand], s_j)
    # The reference accumulates the pair terms into a float64 array, then softmaxes in float32.
    return torch.softmax(pairs.double().sum(dim=1).float(), dim=0)


def _direction_row(direction: str, width: int) -> torch.Tensor:
    if direction == "left":
        return torch.linspace(1, 0, width)
    if direction == "right":
        return torch.linspace(0, 1, width)
    if direction == "middle":
        return torch.cat([torch.linspace(0, 1, width // 2), torch.linspace(1, 0, width - width // 2)])
    return torch.ones(width)


# (direction, W, device) -> `[W]` row on that device: the map is the row repeated down the image, so one
# small row per image width is built (on the CPU, where its values are defined) and copied once.
_DIRECTION_ROWS: dict[tuple[str, int, str], torch.Tensor] = {}
_DIRECTION_ROWS_MAX = 64


def direction_mask(direction: str, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """`[H, W]` weights favouring the named side: left falls 1 -> 0, right rises 0 -> 1, middle is a
    triangle 0 -> 1 -> 0 (`cat(linspace(0, 1, W // 2), linspace(1, 0, W - W // 2))`); others are ones.

    A broadcast view of a cached `[W]` row on `device`: after the first image of a width, no host
    work and no transfer (the values are those of the CPU `linspace`, copied once per width and device).
    """
    direction = direction if direction in ("left", "right", "middle") else "none"
    key = (direction, int(width), str(torch.device(device) if device is not None else torch.device("cpu")))
    row = _DIRECTION_ROWS.get(key)
    if row is None:
        if len(_DIRECTION_ROWS) >= _DIRECTION_ROWS_MAX:
            _DIRECTION_ROWS.clear()
        row = _direction_row(direction, width)
        if device is not None:
            row = row.to(device, non_blocking=True)
        _DIRECTION_ROWS[key] = row
    return row.expand(height, width)


def minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min())


def coherence_map(heat: torch.Tensor, size: tuple[int, int], direction: str = "none") -> torch.Tensor:
    """A GEM heat map `[S, S]` -> the SC weight map `[H, W]` (resize, min-max, direction, / mean)."""
    resized = TF.resize(heat[None].float(), list(size), antialias=True)[0]
    weights = minmax(resized) * direction_mask(direction, size[0], size[1], resized.device)
    return weights / weights.mean()


def coherence_scores(weights: torch.Tensor, masks: torch.Tensor, relation: str = "none") -> torch.Tensor:
    """SC `[C]` of candidate masks `[C, H, W] bool` under the weight map `[H, W]`.

    Sums run in float64 (the reference sums float32 pixel by pixel), so the last digits may differ.
    """
    black = BLACK.get(relation, BLACK_DEFAULT)
    flat = masks.flatten(1).double()
    w = weights.flatten().double()
    inside = flat @ w
    area = flat.sum(1)
    outside = w.sum() - inside
    return ((2 - black) * inside / area - black * outside / (w.numel() - area)).float()


def final_pick(candidates: list[int], sr: torch.Tensor, sc: torch.Tensor, alpha: float,
               nan_policy: str = "wins") -> tuple[int, torch.Tensor]:
    """`(chosen proposal, [C] final scores)` with final = (1 - alpha) * sr + alpha * sc."""
    best, final = final_pick_index(sr, sc, alpha, nan_policy)
    return candidates[int(best)], final


def final_pick_index(sr: torch.Tensor, sc: torch.Tensor, alpha: float,
                     nan_policy: str = "wins") -> tuple[torch.Tensor, torch.Tensor]:
    """`final_pick` on the device: `(position of the pick among the candidates (0-d), [C] final scores)`."""
    final = (1 - alpha) * sr + alpha * sc
    ranked = final if nan_policy == "wins" else torch.nan_to_num(final, nan=float("-inf"))
    return torch.argmax(ranked), final
