"""`ColourRegionProposer`: candidate masks for flat-colour pictures, with no model and no download.

The demo world (`copatch.demo.world`) paints every object in one exact colour over a flat or noisy
grey background, so an object's visible mask is a connected region of one colour. This proposer
finds such regions:

1. two 4-neighbouring pixels belong together when every channel differs by at most `tolerance`
   (0, the default, is exact equality: the demo scenes are lossless PNGs; a few units absorb JPEG
   noise inside flat regions);
2. the connected components of that graph are the regions (NumPy union-find, no SciPy);
3. regions smaller than `min_area` of the image (noise specks, anti-aliased rims) or larger than
   `max_area` (the background of a flat-background scene) are dropped;
4. with `merge_same_colour`, the regions of the same colour (mean colours within `tolerance + 1`
   per channel) are also proposed together: an object cut in two by an occluder, or a background
   split by the objects, is then one candidate as well.

Masks come largest first, then the same-colour unions; the order is a function of the pixels only.
It suits the demo world and pictures like it (flat shapes, diagrams, cartoons). A photograph has no
flat regions: there, use SAM or Mask2Former with real weights (see README, "Your own images").
"""

from __future__ import annotations

import numpy as np
import torch

from copatch.proposals import Proposals
from copatch.types import ImageSample


def connected_regions(image: np.ndarray, tolerance: int = 0) -> np.ndarray:
    """Label the flat-colour regions of an image.

    Args:
        image: `[H, W, C]` integer pixels (uint8 RGB).
        tolerance: two 4-neighbours join when `max_c |a_c - b_c| <= tolerance`.

    Returns:
        `[H, W] int64` labels `0..R-1`, numbered in the raster order of each region's first pixel.
    """
    height, width = image.shape[:2]
    pixels = image.astype(np.int16).reshape(height, width, -1)
    index = np.arange(height * width).reshape(height, width)
    edges = []
    # Horizontal and vertical neighbour pairs whose colours agree within the tolerance.
    same_h = np.abs(pixels[:, 1:] - pixels[:, :-1]).max(-1) <= tolerance
    same_v = np.abs(pixels[1:] - pixels[:-1]).max(-1) <= tolerance
    edges.append((index[:, :-1][same_h], index[:, 1:][same_h]))
    edges.append((index[:-1][same_v], index[1:][same_v]))
    u = np.concatenate([e[0] for e in edges])
    v = np.concatenate([e[1] for e in edges])
    parent = np.arange(height * width)
    # Vectorised union-find: hook every edge's larger root under its smaller one, then compress the
    # paths fully; repeat until both ends of every edge share a root. Each round at least halves the
    # number of distinct roots an edge set spans, so a few dozen rounds cover any image.
    while u.size:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            break
        pu, pv = pu[differ], pv[differ]
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    # Roots are the smallest pixel index of their region, so ranking them gives raster order.
    _, labels = np.unique(parent, return_inverse=True)
    return labels.reshape(height, width).astype(np.int64)


class ColourRegionProposer:
    """Connected flat-colour regions of an image as candidate masks (see the module docstring).

    Args:
        tolerance: largest per-channel difference of two neighbouring pixels of one region (0: exact).
        min_area: drop regions smaller than this fraction of the image (default 0.004: 65 px at
            128 x 128, below the smallest visible demo object, about 170 px).
        max_area: drop regions larger than this fraction of the image (default 0.5: the background of
            a flat-background scene; the largest demo object covers about 17 %).
        merge_same_colour: also propose the union of the kept regions of each colour that has more
            than one (occluded objects split in two pieces).

    Call it on an `ImageSample` (`image` `[3, H, W] uint8`); it returns `Proposals` with `masks`
    `[N, H, W] bool` on the image's device and no scores.
    """

    def __init__(self, tolerance: int = 0, min_area: float = 0.004, max_area: float = 0.5,
                 merge_same_colour: bool = True) -> None:
        if tolerance < 0 or not 0.0 <= min_area < max_area <= 1.0:
            raise ValueError(f"ColourRegionProposer needs tolerance >= 0 and 0 <= min_area < max_area <= 1, got "
                             f"tolerance={tolerance}, min_area={min_area}, max_area={max_area}")
        self.tolerance, self.min_area, self.max_area = int(tolerance), float(min_area), float(max_area)
        self.merge_same_colour = bool(merge_same_colour)

    def masks(self, image: np.ndarray) -> np.ndarray:
        """`[N, H, W] bool` candidate masks of an `[H, W, 3] uint8` image."""
        height, width = image.shape[:2]
        labels = connected_regions(image, self.tolerance)
        flat = labels.reshape(-1)
        count = int(flat.max()) + 1 if flat.size else 0
        areas = np.bincount(flat, minlength=count)
        total = float(height * width)
        keep = np.nonzero((areas >= self.min_area * total) & (areas <= self.max_area * total))[0]
        # Largest first; ties by label (raster order), so the order depends on the pixels alone.
        keep = keep[np.lexsort((keep, -areas[keep]))]
        masks = [labels == k for k in keep]
        if self.merge_same_colour and len(keep) > 1:
            colours = np.stack([
                np.bincount(flat, weights=image[..., c].reshape(-1).astype(np.float64), minlength=count)[keep]
                / areas[keep] for c in range(image.shape[2])], axis=1)  # [K, 3] mean colour per region
            close = np.abs(colours[:, None] - colours[None]).max(-1) <= self.tolerance + 1  # [K, K]
            seen: set[tuple[int, ...]] = set()
            for k in range(len(keep)):
                group = tuple(int(j) for j in np.nonzero(close[k])[0])
                if len(group) > 1 and group not in seen:
                    seen.add(group)
                    masks.append(np.isin(labels, keep[list(group)]))
        if not masks:
            return np.zeros((0, height, width), dtype=bool)
        return np.stack(masks)

    def __call__(self, sample: ImageSample) -> Proposals:
        image = sample.image.permute(1, 2, 0).cpu().numpy()
        masks = torch.from_numpy(self.masks(image))
        return Proposals(masks.to(sample.image.device))

    def __repr__(self) -> str:
        return (f"ColourRegionProposer(tolerance={self.tolerance}, min_area={self.min_area}, "
                f"max_area={self.max_area}, merge_same_colour={self.merge_same_colour})")
