"""A custom proposer: CoPatch with candidate masks from your own code.

    python examples/custom_proposer.py [--index 18]

A proposer is any callable `proposer(sample) -> Proposals`: `sample.image` is the `[3, H, W] uint8`
image and `Proposals.masks` must be `[N, H, W] bool` at the same size (`copatch.proposals`). Pass it
to `CoPatch(proposer=...)` (or `from_preset(..., proposer=...)`) and `segment` needs no proposals.

`ColourRegions` below proposes the connected regions of one flat colour: the objects of a demo-world
scene (flat shapes on a dark background), plus the largest region as the background. It knows
nothing of the scene; compare its picks with those from the dataset's stored proposals.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from copatch.demo.dataset import demo_image
from copatch.module import CoPatch
from copatch.proposals import Proposals
from copatch.types import ImageSample


class ColourRegions:
    """Connected regions of (quantised) constant colour as proposals.

    Args:
        levels: colour levels per channel after quantisation (8: values 0-31 are one level, ...).
        min_area: regions smaller than this many pixels are dropped (anti-aliasing crumbs).
    """

    def __init__(self, levels: int = 8, min_area: int = 20) -> None:
        self.levels = levels
        self.min_area = min_area

    def __call__(self, sample: ImageSample) -> Proposals:
        """`sample.image` `[3, H, W] uint8` -> `Proposals` with `masks` `[N, H, W] bool`, largest first."""
        image = sample.image.cpu().long()
        step = 256 // self.levels
        code = ((image[0] // step) * self.levels + image[1] // step) * self.levels + image[2] // step  # [H, W]
        regions = []
        for value in code.unique():
            regions.extend(connected_components(code == value))
        regions = [r for r in regions if int(r.sum()) >= self.min_area]
        regions.sort(key=lambda r: -int(r.sum()))
        masks = torch.stack(regions) if regions else torch.zeros(0, *sample.size, dtype=torch.bool)
        return Proposals(masks)


def connected_components(mask: torch.Tensor) -> list[torch.Tensor]:
    """`[H, W] bool` -> one `[H, W] bool` mask per 8-connected component.

    Every pixel starts with its own label; each round a pixel takes the largest label in its 3 x 3
    neighbourhood inside the mask, until nothing changes: each component ends up with one label.
    """
    height, width = mask.shape
    inside = mask[None, None]
    labels = torch.where(inside, torch.arange(1, height * width + 1, dtype=torch.float64).view(1, 1, height, width),
                         torch.zeros((), dtype=torch.float64))
    while True:
        grown = torch.where(inside, F.max_pool2d(labels, 3, stride=1, padding=1), labels)
        if torch.equal(grown, labels):
            break
        labels = grown
    labels = labels[0, 0]
    return [labels == value for value in labels.unique() if value > 0]


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="demo dataset seed")
    parser.add_argument("--index", type=int, default=18, help="which demo scene")
    args = parser.parse_args(argv)

    scene, image, truth, chosen, stored = demo_image(seed=args.seed, index=args.index)
    expressions = [c.text for c in chosen]

    proposer = ColourRegions()
    model = CoPatch.from_preset("demo", proposer=proposer)
    predictions = model.segment(image, expressions)  # proposals come from ColourRegions
    with_stored = model.segment(image, expressions, proposals=stored)  # the dataset's proposals, to compare

    found = proposer(ImageSample(image_id=0, image=torch.from_numpy(image).permute(2, 0, 1), expressions=[]))
    print(f"ColourRegions: {len(found)} regions ({len(scene.objects)} objects in the scene, "
          f"{len(stored)} stored proposals)")
    for pred, ref, expr in zip(predictions, with_stored, chosen):
        target = torch.from_numpy(truth[expr.target])
        iou = float((pred.mask & target).sum() / (pred.mask | target).sum())
        ref_iou = float((ref.mask & target).sum() / (ref.mask | target).sum())
        print(f"{pred.text!r}: region {pred.chosen}, {int(pred.mask.sum())} pixels, IoU {iou:.2f} "
              f"(stored proposals: IoU {ref_iou:.2f})")
    return predictions


if __name__ == "__main__":
    main()
