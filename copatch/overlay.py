"""Pictures of what CoPatch chose: the image, the CoMap clusters, the candidates and the pick.

`render_overlay` draws two panels side by side, with the expression as a caption:
- left: the image with the CoMap clusters as contours (cluster 1 red, 2 orange, 3 yellow) over the
  patch grid, and the ground truth as a white contour when it is known;
- right: the candidates as thin contours (g cyan, b_j blue) and the chosen mask filled in green.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

CLUSTER_COLOURS = [(230, 40, 40), (250, 150, 30), (250, 230, 40)]
TOP1_COLOUR, CLUSTER_BEST_COLOUR, CHOSEN_COLOUR, TRUTH_COLOUR = (40, 220, 230), (60, 90, 250), (40, 200, 70), (255,) * 3


def contour(mask: np.ndarray) -> np.ndarray:
    """`[H, W] bool` -> the mask's inner boundary pixels (4-neighbourhood)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: tuple[int, ...], alpha: float = 1.0) -> None:
    canvas[mask] = (1 - alpha) * canvas[mask] + alpha * np.asarray(colour, dtype=np.float32)


def render_overlay(image: torch.Tensor, text: str, chosen: torch.Tensor, clusters: torch.Tensor,
                   candidates: torch.Tensor | None = None, top1_first: bool = True,
                   truth: torch.Tensor | None = None, iou: float | None = None) -> Image.Image:
    """Draw one prediction.

    Args:
        image: `[3, H, W] uint8`.
        text: the expression.
        chosen: `[H, W] bool` the chosen mask.
        clusters: `[k, G, G] bool` CoMap clusters on the patch grid.
        candidates: `[C, H, W] bool` candidate masks, g first when `top1_first`, or None.
        truth: `[H, W] bool` ground truth, or None.
        iou: shown in the caption when given.

    Returns:
        An RGB image `(2 W) x (H + caption)`.
    """
    height, width = image.shape[-2:]
    base = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    left, right = base.copy(), base.copy()
    if clusters.shape[0]:
        # Nearest upsampling shows the patch cells the clusters are made of.
        cells = F.interpolate(clusters[None].float(), size=(height, width), mode="nearest")[0].bool().cpu().numpy()
        for k, cell in enumerate(cells):
            _paint(left, cell, CLUSTER_COLOURS[k % 3], 0.25)
            _paint(left, contour(cell), CLUSTER_COLOURS[k % 3])
    if truth is not None:
        _paint(left, contour(truth.cpu().numpy()), TRUTH_COLOUR)
    _paint(right, chosen.cpu().numpy(), CHOSEN_COLOUR, 0.5)
    if candidates is not None:
        for c, cand in enumerate(candidates.cpu().numpy()):
            colour = TOP1_COLOUR if (c == 0 and top1_first) else CLUSTER_BEST_COLOUR
            _paint(right, contour(cand), colour)
    panels = np.concatenate([left, right], axis=1).clip(0, 255).astype(np.uint8)
    font = ImageFont.load_default()
    caption_h = 18
    out = Image.new("RGB", (2 * width, height + caption_h), (0, 0, 0))
    out.paste(Image.fromarray(panels), (0, 0))
    caption = text if iou is None else f"{text}  (IoU {iou:.2f})"
    ImageDraw.Draw(out).text((4, height + 3), caption, fill=(255, 255, 255), font=font)
    return out
