"""The data that flows between the DataModules, the proposers and the `CoPatch` module.

One `ImageSample` per image carries every expression that refers to something in it, so that all
image-side work (proposals, mask embeddings, exit-layer patch features) is done once per image.
Expressions are keyed by the dataset's own ids (`sent_id` for the REFER family, `task_id` for
PhraseCut), never by batch position.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


@dataclass
class Expression:
    """One referring expression.

    Attributes:
        id: the dataset's expression id (`sent_id` / `task_id`); keys every output.
        text: the raw expression as the dataset gives it.
        ref_id: the referred object's id (REFER `ref_id`), if the dataset has one.
    """

    id: int | str
    text: str
    ref_id: int | None = None


@dataclass
class ImageSample:
    """One image with all of its expressions.

    Attributes:
        image_id: the dataset's image id.
        image: `[3, H, W] uint8` RGB at the original resolution. (With `CoPatch(max_side=...)` the
            stages of a large image get a reduced copy of its sample, `CoPatch.working_sample`.)
        expressions: the `E` expressions on this image, in a deterministic order.
        targets: `[E, H, W] bool` ground truth per expression, or None when unknown.
        instance_masks: `[A, H, W] bool` every annotated instance of the image (for the
            ground-truth oracle proposer), or None.
        file_name: where the image came from, for error messages and outputs.
        error: why the image could not be loaded (missing, unreadable, not the annotated size), or
            None. A DataModule that cannot load an image still returns its sample, with a black
            `image` of the annotated size and the ground truth, so that the run goes on and the
            module records the image's expressions as failures (IoU 0) instead of crashing.
        proposals: candidate masks given with the image (`copatch.proposals.Proposals`); when set they
            are used instead of the model's proposer (`CoPatch.segment(..., proposals=...)`).
        prepared: model inputs derived from `image` alone, made ahead of time in the DataLoader's
            workers (`copatch.prepare`), keyed by the step and its settings; a stage uses one only
            when its own key is there, and computes the input itself otherwise.
    """

    image_id: int | str
    image: torch.Tensor
    expressions: list[Expression]
    targets: torch.Tensor | None = None
    instance_masks: torch.Tensor | None = None
    file_name: str = ""
    error: str | None = None
    proposals: Any = None
    prepared: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """`(H, W)` of the original image."""
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    def pin_memory(self) -> "ImageSample":
        """A copy with every tensor (image, masks, prepared inputs, proposals) in pinned memory.

        The DataLoader calls this in its pinning thread when `pin_memory=True` (the DataModules turn it
        on when CUDA is available): copies from pinned memory to the GPU are faster and can overlap
        with compute, which matters for the ~60 MB of proposal masks an image carries.
        """
        return map_tensors(self, lambda t: t.pin_memory())


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`obj` with `fn` applied to each tensor in it, through dataclasses (copied), dicts, lists, tuples."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


@dataclass
class Prediction:
    """What `CoPatch.predict_step` returns for one expression.

    Attributes:
        expression_id: the dataset's id of the expression.
        image_id: the dataset's id of the image.
        text: the expression.
        mask: `[H, W] bool` the chosen mask (all False when the image had no proposals).
        chosen: index of the chosen proposal, or -1 when there were none.
        candidates: proposal indices reranked by the final pick (`[g, b_1, b_2]` by default).
        candidate_scores: the score of each candidate used by the final pick.
        clusters: `[k, G, G] bool` the CoMap clusters on the patch grid (k <= top_k).
        iou: IoU with the ground truth, or None when it is unknown.
        oracle_iou: best IoU with the ground truth over `[g, b_1, ..., b_k]`, or None.
        extras: anything a stage wants to expose (parse, thresholds), JSON-serialisable.
        inter, union: pixel counts `|P & G|`, `|P | G|` with the ground truth, or None when it is
            unknown; the metrics are recomputed exactly from these (`copatch evaluate`).
        oracle_inter, oracle_union: the same counts for the top-k oracle's best candidate.
        failure: `{"kind", "file", "error"}` when the expression could not be evaluated (a missing
            or unreadable image or proposals file, or no proposals); it then counts as IoU 0.
        score: a confidence in [0, 1] for the chosen mask (`match_score`), for thresholding "no good
            match"; None when nothing was chosen. A heuristic, not a probability fitted to data.
    """

    expression_id: int | str
    image_id: int | str
    text: str
    mask: torch.Tensor
    chosen: int
    candidates: list[int]
    candidate_scores: list[float]
    clusters: torch.Tensor
    iou: float | None = None
    oracle_iou: float | None = None
    extras: dict = field(default_factory=dict)
    inter: int | None = None
    union: int | None = None
    oracle_inter: int | None = None
    oracle_union: int | None = None
    failure: dict | None = None
    score: float | None = None

    def mask_numpy(self) -> np.ndarray:
        """The chosen mask as a NumPy array, `[H, W] bool` (all False when nothing was chosen)."""
        return self.mask.detach().cpu().numpy().astype(bool)

    def save_mask(self, path: str | os.PathLike) -> Path:
        """Write the chosen mask as a binary PNG (0 background, 255 mask; 8-bit grey) at the image's
        size, atomically (a temporary file in the same folder, then renamed), and return the path.
        The folder is created if needed. Read it back with `np.asarray(Image.open(path)) > 0`."""
        from PIL import Image

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = self.mask_numpy().astype(np.uint8) * 255
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                Image.fromarray(pixels, mode="L").save(f, format="PNG")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def overlay(self, image: Any, proposals: Any = None, truth: Any = None) -> "PIL.Image.Image":  # noqa: F821
        """A picture of this prediction (`copatch.overlay.render_overlay`): the image with the CoMap
        clusters (and `truth`), the candidates and the chosen mask, the expression with its IoU and
        `score`, and a legend of the colours.

        Args:
            image: the image the prediction was made on, as `CoPatch.segment` takes it (PIL image, file
                path, `[H, W(, 3|4)]` array or `[3, H, W]` tensor).
            proposals: the `[N, H, W]` masks (tensor, array or `Proposals`) the prediction chose from,
                to draw its candidates (`self.candidates` index them); None draws the chosen mask only.
            truth: `[H, W]` ground-truth mask to outline, or None.

        Returns:
            An RGB PIL image, `(2 s W) x (s H + band)` (see `render_overlay`).
        """
        from copatch.api import as_proposals, image_tensor
        from copatch.errors import UserValueError
        from copatch.overlay import render_overlay

        pixels = image_tensor(image)
        size = tuple(self.mask.shape[-2:])
        if tuple(pixels.shape[-2:]) != size:
            raise UserValueError(f"Prediction.overlay: the image is {tuple(pixels.shape[-2:])} (H, W) but the "
                                 f"prediction's mask is {size}; pass the image the prediction was made on.")
        candidates = None
        if proposals is not None and self.candidates:
            candidates = as_proposals(proposals, size).masks.cpu()[self.candidates]
        truth_t = None if truth is None else torch.as_tensor(np.asarray(truth)).bool()
        return render_overlay(pixels, self.text, self.mask, self.clusters, candidates, truth=truth_t,
                              iou=self.iou, score=self.score)


def match_score(mask_scores: torch.Tensor, masks: torch.Tensor, chosen: int) -> float | None:
    """The confidence of a chosen proposal: the global-local probability mass on masks like it.

    `p = softmax(mask_scores)` over all N proposals (the logit-scale global-local scores, so the CLIP
    model's own temperature sets how peaked it is), and the score is `sum_j p_j IoU(chosen, j)`: the
    share of the text-image evidence that falls on the chosen mask, counting near-duplicates of it
    (a dilated or partial copy) by their overlap instead of letting them split it. It is 1 when all
    mass is on the chosen mask (or copies of it), about `1/N` for a pick the scores do not single out,
    and lower still when spatial guidance picked a mask the scores disfavour. It rises with the chosen
    mask's own score when the others are fixed. A heuristic, not a probability fitted to data; on the
    demo world it tracks the fraction of right picks (README, "Use it in your project").

    Args:
        mask_scores: `[N]` logit-scale global-local scores of the proposals against the expression.
        masks: `[N, H, W] bool` the proposals.
        chosen: index of the chosen proposal.

    Returns:
        A float in [0, 1], or None when the scores are not finite.
    """
    value = float(match_score_tensor(mask_scores, masks, masks[chosen][None]))
    return value if math.isfinite(value) else None


def match_score_tensor(mask_scores: torch.Tensor, masks: torch.Tensor, chosen_mask: torch.Tensor) -> torch.Tensor:
    """`match_score` left on the device: a 0-d float64 tensor (NaN when the scores are not finite).

    `chosen_mask` is `[1, H, W]`, the chosen proposal's mask, so that no index is read back."""
    return match_scores_tensor([mask_scores], masks, chosen_mask)[0]


def match_scores_tensor(mask_scores: list[torch.Tensor], masks: torch.Tensor, chosen_masks: torch.Tensor) -> torch.Tensor:
    """`match_score` of E expressions of one image at once, on the device: `[E]` float64.

    `mask_scores` holds E `[N]` score vectors and `chosen_masks` `[E, H, W]` the chosen masks. The IoUs
    with the N proposals are one `pairwise_iou` call for all E (exact pixel counts, so the same numbers
    as one expression at a time), which reads the N full-resolution masks once instead of E times."""
    from copatch.masks import pairwise_iou

    overlap = pairwise_iou(chosen_masks.bool(), masks.bool())  # [E, N]
    out = []
    for scores, row in zip(mask_scores, overlap):
        p = scores.detach().double().softmax(0)
        out.append((p * row.to(p.device, p.dtype)).sum().clamp(0.0, 1.0))
    return torch.stack(out)
