"""CoMap: the patch-text similarity map, its clusters, and the clusters upsampled to image size.

Reference behaviour (method-notes a.6, a.7, g.1, g.2), all the default:
- The similarity normalises the patch embeddings over the *patch* axis, not the channel axis
  (`similarity_norm="patches"`) and multiplies by CLIP's logit scale (the float32 of exp(ln 100)):
  the logit-scale scores `S`, all in float32.
- Patches are visited in descending `S` (the logit-scale scores, not `S / 100`: in float32 the
  division maps about 13% of neighbouring values between 10 and 40 onto one value, and such a tie
  would go to the lower index instead of the larger `S`), ties to the lower flat index, and only the
  first `G*G - 1` of them (the reference builds consecutive pairs, so the last patch is never visited).
- The thresholds are compared with `S / 100` (float32 division, as the reference).
- The threshold starts at `delta - 0.05` and steps down by 0.05 in float64 (0.25, 0.2,
  0.15000000000000002, ...) until at least one patch is clustered; it may go negative.
- Greedy growth: the walk stops at the first patch with score <= threshold; each visited patch takes
  the id of the first earlier-visited 8-neighbour, else opens a new id. Ids never merge. Then each
  singleton, in visit order, takes the id of the first other clustered 8-neighbour.
- Clusters are taken in the iteration order of a Python `set` of their ids (ids {1, 3, 10} iterate as
  [1, 10, 3]); the first k are kept and upsampled bilinearly with align_corners=True.

`clustering="bfs"` labels the 8-connected components of {score > threshold} over all patches instead,
numbering them by their best patch, as the paper's "BFS" reads.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# The reference multiplies by CLIP's logit scale and divides by the constant 100. For OpenAI CLIP
# exp(logit_scale) is exactly this float32 value; we use the constant so that delta keeps its meaning
# for any model (a random or tiny model has another logit scale).
REFERENCE_LOGIT_SCALE = float(torch.tensor(math.log(100.0), dtype=torch.float32).exp())
THRESHOLD_STEP = 0.05


@dataclass
class Clusters:
    """Clusters of one expression's similarity map.

    Attributes:
        labels: `[G, G] int64` cluster id per patch, 0 = not clustered.
        order: the cluster ids in the order they are used (the first k are the CoMap).
        threshold: the threshold at which the walk first clustered something.
    """

    labels: torch.Tensor
    order: list[int]
    threshold: float

    def masks(self, k: int) -> torch.Tensor:
        """`[min(k, #clusters), G, G] bool` masks of the first k clusters."""
        ids = self.order[:k]
        if not ids:
            return torch.zeros(0, *self.labels.shape, dtype=torch.bool)
        return torch.stack([self.labels == i for i in ids])


def similarity_map(patches: torch.Tensor, text: torch.Tensor, norm: str = "patches") -> torch.Tensor:
    """Logit-scale patch-text scores `S` (100 x the similarity; `cluster_patches` divides by 100).

    The order of operations is the reference's, `(scale * p) @ t.T`, so the float32 values (and with
    them the visit order and the ties) are the same.

    Args:
        patches: `[P, D]` exit-layer patch embeddings of one image.
        text: `[E, D]` text embeddings (raw).
        norm: "patches" (reference: unit norm per channel over the P patches) or "channels" (cosine).

    Returns:
        `[E, P] float32` logit-scale scores.
    """
    patches, text = patches.float(), text.float()
    dim = 0 if norm == "patches" else 1
    p = patches / patches.norm(dim=dim, keepdim=True)
    t = text / text.norm(dim=1, keepdim=True)
    return ((REFERENCE_LOGIT_SCALE * p) @ t.T).T


def visit_order(score: torch.Tensor) -> np.ndarray:
    """Flat patch indices by descending score, ties to the lower index (a stable sort).

    Pass the logit-scale `S`, as the reference sorts: sorting `S / 100` would merge float32 neighbours.
    """
    return torch.sort(score.detach().cpu(), descending=True, stable=True).indices.numpy()


def _neighbours(a: np.ndarray, b: int, grid: int) -> np.ndarray:
    """Whether each flat index in `a` is an 8-neighbour of `b` (b itself excluded)."""
    dr = np.abs(a // grid - b // grid)
    dc = np.abs(a % grid - b % grid)
    return (dr <= 1) & (dc <= 1) & (a != b)


def greedy_labels(score: np.ndarray, order: np.ndarray, grid: int, threshold: float) -> dict[int, int]:
    """One greedy walk at `threshold`: `{flat patch index: cluster id}` in visit order."""
    thr = np.float32(threshold)
    visited: list[int] = []
    labels: dict[int, int] = {}
    next_id = 1
    for p in order[:-1]:
        if score[p] <= thr:  # float32 against float32, as the reference; a NaN score never stops the walk
            break
        near = np.flatnonzero(_neighbours(np.asarray(visited, dtype=np.int64), int(p), grid)) if visited else []
        if len(near):
            labels[int(p)] = labels[visited[near[0]]]
        else:
            labels[int(p)] = next_id
            next_id += 1
        visited.append(int(p))
    counts: dict[int, int] = {}
    for cid in labels.values():
        counts[cid] = counts.get(cid, 0) + 1
    members = np.asarray(list(labels), dtype=np.int64)
    for p, cid in list(labels.items()):
        if counts[cid] == 1:
            near = np.flatnonzero(_neighbours(members, p, grid))
            if len(near):
                labels[p] = labels[int(members[near[0]])]
    return labels


def bfs_labels(score: np.ndarray, order: np.ndarray, grid: int, threshold: float) -> dict[int, int]:
    """8-connected components of {score > threshold}, numbered by their best patch, in visit order."""
    high = score > np.float32(threshold)
    labels: dict[int, int] = {}
    next_id = 1
    for seed in order:
        seed = int(seed)
        if not high[seed] or seed in labels:
            continue
        labels[seed] = next_id
        queue = deque([seed])
        while queue:
            p = queue.popleft()
            r, c = divmod(p, grid)
            for rr in range(max(r - 1, 0), min(r + 2, grid)):
                for cc in range(max(c - 1, 0), min(c + 2, grid)):
                    q = rr * grid + cc
                    if high[q] and q not in labels:
                        labels[q] = next_id
                        queue.append(q)
        next_id += 1
    return {int(p): labels[int(p)] for p in order if int(p) in labels}


def cluster_patches(score: torch.Tensor, grid: int, delta: float, *, method: str = "greedy",
                    order_by: str = "python_set", first_threshold: str = "delta_minus_step") -> Clusters:
    """Cluster one expression's similarity map.

    Args:
        score: `[G*G]` float32 logit-scale scores `S` (a `similarity_map` row). The patches are
            visited in descending `S`; the thresholds are compared with `S / 100`.
        grid: G.
        delta: the cluster threshold on the `S / 100` scale (0.3 for ViT-B/16).
        method: "greedy" (reference) or "bfs".
        order_by: "python_set" (reference) or "seed_score" (ids ascending = by best patch).
        first_threshold: "delta_minus_step" (reference: try delta - 0.05 first) or "delta".
    """
    score = score.detach().float().cpu()
    # The reference sorts S but compares `S / 100` (a float32 division) with the threshold.
    values = (score / 100).numpy()
    order = visit_order(score)
    label_fn = greedy_labels if method == "greedy" else bfs_labels
    threshold = delta if first_threshold == "delta" else delta - THRESHOLD_STEP
    finite = values[np.isfinite(values)]
    floor = float(finite.min()) - 1.0 if finite.size else -1.0
    while True:
        labels = label_fn(values, order, grid, threshold)
        if labels or threshold < floor:
            break
        threshold -= THRESHOLD_STEP
    flat = torch.zeros(grid * grid, dtype=torch.int64)
    for p, cid in labels.items():
        flat[p] = cid
    return Clusters(flat.view(grid, grid), order_cluster_ids(list(labels.values()), order_by), float(threshold))


def order_cluster_ids(ids: list[int], rule: str = "python_set") -> list[int]:
    """Distinct cluster ids (given in visit order) in the order the clusters are used.

    "python_set" iterates a Python `set` of the ids as the reference does: for small ints that is
    slot order in the hash table, so {1, 3, 10} gives [1, 10, 3]. "seed_score" sorts the ids, which
    ranks clusters by their best patch since ids are handed out in descending score.
    """
    if rule == "python_set":
        return list(set(ids))
    if rule == "seed_score":
        return sorted(set(ids))
    raise ValueError(f"unknown cluster_order {rule!r}: use 'python_set' or 'seed_score'")


def upsample_clusters(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[k, G, G] bool` -> `[k, H, W] float` soft masks (bilinear, align_corners=True)."""
    if masks.shape[0] == 0:
        return torch.zeros(0, *size, device=masks.device)
    return F.interpolate(masks[None].float(), size=size, mode="bilinear", align_corners=True)[0]
