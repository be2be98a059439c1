"""Candidate selection with CoMap (method-notes a.8, g.3).

- g: the proposal with the best global-local score (first maximum).
- b_j: the proposal with the highest IoU with CoMap cluster j (first maximum; a row of zeros gives
  proposal 0, as the reference's argmax does). The soft upsampled cluster is binarised by `> 0`
  (reference; dilates it by up to one patch cell) or `> 0.5` (`cluster_binarize="half"`).
- candidates: `[g, b_1, ..., b_k]` cut to `min(k, N, len)` entries, so with k = 3 the reference keeps
  `[g, b_1, b_2]` and drops b_3 (`keep_last_cluster=True` keeps it). Duplicates stay.
- The top-k oracle is the best ground-truth IoU over `[g, b_1, ..., b_k]`, never cut.

Without CoMap (`select_top_k`, the paper's baseline) the candidates are the k proposals with the
best global-local scores, in descending order.

The final pick is the spatial guidance (`copatch.spatial`); with it switched off, `pick_by_score`
takes the candidate with the best global-local score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from copatch.masks import pairwise_iou


@dataclass
class Selection:
    """The candidates of one expression.

    Attributes:
        top1: g, index of the best proposal by global-local score.
        cluster_best: `[b_1, ..., b_k]` best proposal per cluster.
        candidates: the list the final pick reranks.
    """

    top1: int
    cluster_best: list[int]
    candidates: list[int]

    @property
    def oracle_pool(self) -> list[int]:
        """The proposals the top-k oracle chooses from: `[g, b_1, ..., b_k]`, or the candidates
        themselves when they do not come from CoMap."""
        return [self.top1, *self.cluster_best] if self.cluster_best else list(self.candidates)


def binarize_clusters(soft: torch.Tensor, rule: str = "positive") -> torch.Tensor:
    """`[k, H, W]` soft cluster maps -> bool: `> 0` ("positive", reference) or `> 0.5` ("half")."""
    if rule == "positive":
        return soft > 0
    if rule == "half":
        return soft > 0.5
    raise ValueError(f"unknown cluster_binarize rule {rule!r}: use 'positive' or 'half'")


def select_candidates(scores: torch.Tensor, soft_clusters: torch.Tensor, masks: torch.Tensor, *,
                      top_k: int = 3, binarize: str = "positive", keep_last_cluster: bool = False) -> Selection:
    """Candidates for one expression.

    Args:
        scores: `[N]` global-local scores of the proposals.
        soft_clusters: `[k, H, W]` upsampled CoMap clusters (k may be 0).
        masks: `[N, H, W] bool` proposals, N >= 1.
        top_k: k, the number of clusters and the length of the candidate list.
        binarize: how a soft cluster becomes a mask for the IoU.
        keep_last_cluster: keep b_k instead of cutting the list at k entries.
    """
    if masks.shape[0] == 0:
        raise ValueError("select_candidates needs at least one proposal")
    iou = pairwise_iou(binarize_clusters(soft_clusters, binarize), masks)  # [k, N]
    return candidates_from_iou(scores, iou, top_k=top_k, keep_last_cluster=keep_last_cluster)


def candidates_from_iou(scores: torch.Tensor, cluster_iou: torch.Tensor, *, top_k: int = 3,
                        keep_last_cluster: bool = False) -> Selection:
    """Candidates from the IoU of each CoMap cluster with each proposal, `cluster_iou` `[k, N]`.

    The module computes the IoUs of all clusters of all an image's expressions in one call, so this is
    the per-expression part of `select_candidates`.
    """
    pool, num_candidates = candidate_pool(scores, cluster_iou, top_k=top_k, keep_last_cluster=keep_last_cluster)
    return selection_from_pool(pool.tolist(), num_candidates, comap=True)


def candidate_pool(scores: torch.Tensor, cluster_iou: torch.Tensor, *, top_k: int = 3,
                   keep_last_cluster: bool = False) -> tuple[torch.Tensor, int]:
    """`candidates_from_iou` without leaving the device: `(pool, C)`.

    `pool` is `[1 + k] int64` on the scores' device, `[g, b_1, ..., b_k]`; the candidates are its first
    `C` entries, and `C` depends on shapes only, so nothing is read back from the device.
    """
    n, k = scores.shape[0], cluster_iou.shape[0]
    top1 = torch.argmax(scores).reshape(1)
    pool = torch.cat([top1, torch.argmax(cluster_iou, dim=1).to(top1.device)]) if k else top1
    return pool, (1 + k if keep_last_cluster else min(top_k, n, 1 + k))


def top_k_pool(scores: torch.Tensor, top_k: int = 3) -> tuple[torch.Tensor, int]:
    """`select_top_k` on the device: `(the min(k, N) best indices, best first, C = min(k, N))`."""
    c = min(top_k, scores.shape[0])
    return torch.topk(scores, k=c).indices, c


def selection_from_pool(pool: list[int], num_candidates: int, comap: bool) -> Selection:
    """The `Selection` of a pool read back from the device (`candidate_pool`, or `top_k_pool` without
    CoMap)."""
    if comap:
        return Selection(pool[0], pool[1:], pool[:num_candidates])
    return Selection(pool[0], [], pool[:num_candidates])


def select_top_k(scores: torch.Tensor, top_k: int = 3) -> Selection:
    """Baseline candidates: the `min(k, N)` best proposals by global-local score, best first."""
    pool, c = top_k_pool(scores, top_k)
    return selection_from_pool(pool.tolist(), c, comap=False)


def pick_by_score(selection: Selection, scores: torch.Tensor) -> tuple[int, list[float]]:
    """Pick without spatial guidance: the candidate with the best global-local score (first maximum)."""
    cand_scores = scores[selection.candidates]
    return selection.candidates[int(torch.argmax(cand_scores))], cand_scores.tolist()


def pick_by_score_index(candidates: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`pick_by_score` on the device: `(position of the pick in candidates (0-d), [C] candidate scores)`."""
    cand_scores = scores.index_select(0, candidates)
    return torch.argmax(cand_scores), cand_scores
