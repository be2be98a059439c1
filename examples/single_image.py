"""Segment one image from Python, without a Trainer.

    python examples/single_image.py [OVERLAY.png]

The three lines a user copies are the ones under "the call" below: build CoPatch from a preset, then
`segment(image, expressions, proposals=masks)` with `image` a PIL image, an `[H, W, 3]` uint8 array
or a `[3, H, W]` tensor and `masks` `[N, H, W]` bool candidate masks.

Here the image is a scene of the demo world and the model is the demo CLIP shipped in the package,
so the example runs on a CPU in seconds with nothing to download. It prints each expression's chosen
mask (its proposal index, area and IoU with the scene's truth) and saves an overlay picture: per
expression, the CoMap clusters (left) and the candidates with the chosen mask filled in (right). The
demo CLIP is tiny (about 28 mIoU on the demo split, see README), so other scenes (`--index`) show
more wrong picks than the default one.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from copatch.demo.dataset import demo_image
from copatch.module import CoPatch
from copatch.overlay import render_overlay


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overlay", nargs="?", help="where to save the overlay PNG (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=1, help="demo dataset seed")
    parser.add_argument("--index", type=int, default=18, help="which demo scene")
    args = parser.parse_args(argv)
    out = Path(args.overlay) if args.overlay else Path(tempfile.mkdtemp(prefix="copatch-")) / "single_image.png"

    # A demo scene: image [H, W, 3] uint8, the visible masks of its objects, expressions that name one
    # object each, and candidate masks [N, H, W] bool (every object plus realistic wrong ones).
    scene, image, truth, chosen, proposals = demo_image(seed=args.seed, index=args.index)
    expressions = [c.text for c in chosen]

    # the call
    model = CoPatch.from_preset("demo")
    predictions = model.segment(image, expressions, proposals=proposals)

    panels = []
    for pred, expr in zip(predictions, chosen):
        target = torch.from_numpy(truth[expr.target])
        iou = float((pred.mask & target).sum() / (pred.mask | target).sum())
        print(f"{pred.text!r}: proposal {pred.chosen} of {len(proposals)}, {int(pred.mask.sum())} pixels, "
              f"IoU {iou:.2f} with the object it names")
        candidates = torch.from_numpy(proposals[pred.candidates]) if pred.candidates else None
        panels.append(np.asarray(render_overlay(torch.from_numpy(image).permute(2, 0, 1), pred.text, pred.mask,
                                                pred.clusters, candidates, truth=target, iou=iou)))
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(panels, axis=0)).save(out)
    print(f"overlay: {out}")
    return predictions


if __name__ == "__main__":
    main()
