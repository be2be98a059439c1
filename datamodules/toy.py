"""A synthetic dataset in the exact REFER format: coloured shapes with referring expressions.

`write_toy_refer` writes what the refer project's zips + COCO train2014 would give, in miniature:

    <root>/refcoco/refs(unc).p, <root>/refcoco/instances.json,
    <root>/images/mscoco/images/train2014/COCO_train2014_%012d.jpg

so the real reader (`ReferDataset`) runs on it unchanged. Every image has 2-4 non-overlapping
shapes (circle, square, triangle), one per cell of a 2x2 grid; every shape is one annotation and
one ref with 1-3 sentences. Each shape is painted through the very mask pycocotools rasterises
from its stored segmentation, so the pixels and the annotations agree exactly.

Edge cases, always present when there are enough images:
- image index 0 (image_id 1): saved grayscale (mode "L").
- image index 1 (image_id 2): its first annotation is a compressed RLE (`iscrowd` 1, str counts).
- image index 2 (image_id 3): its first annotation has two overlapping polygon parts, so the
  union and the reference code's `sum == 1` masks differ exactly on the overlap.
Images go to splits by index, cycling through `SPLIT_CYCLE` (8 images: 5 val, 1 testA, 1 testB, 1 train).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from copatch.datamodules.refer import ReferDataModule, decode_rle

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
_CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 60, 210),
    "yellow": (230, 200, 20),
    "purple": (130, 40, 170),
    "black": (20, 20, 20),
}
SPLIT_CYCLE = ("val", "val", "val", "testA", "testB", "val", "train", "val")
GRAYSCALE_INDEX, RLE_INDEX, MULTIPART_INDEX = 0, 1, 2


def _circle(cx: float, cy: float, r: float, n: int = 24) -> list[float]:
    pts: list[float] = []
    for k in range(n):
        a = 2 * math.pi * k / n
        pts += [round(cx + r * math.cos(a), 2), round(cy + r * math.sin(a), 2)]
    return pts


def _rect(x0: float, y0: float, w: float, h: float) -> list[float]:
    return [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]  # 8 numbers: never read as a bbox


def _sentences(rng: random.Random, colour: str, shape: str, side: str, row: str, size: str) -> list[str]:
    options = [
        f"the {colour} {shape}",
        f"{colour} {shape} on the {side}",
        f"the {size} {shape}",
        f"{shape} at the {row} {side}",
    ]
    chosen = rng.sample(options, rng.randint(1, 3))
    return [s.capitalize() if rng.random() < 0.3 else s for s in chosen]  # raw differs from sent


def write_toy_refer(
    root: str | Path,
    num_images: int = 8,
    seed: int = 0,
    dataset: str = "refcoco",
    size: tuple[int, int] = (96, 128),
) -> Path:
    """Write the toy dataset under `root` (REFER layout, split_by `unc`) and return `root`.

    Args:
        root: destination; `<root>/<dataset>/` and `<root>/images/mscoco/images/train2014/` are created.
        num_images: number of images; image ids are `1..num_images`.
        seed: everything (layout, colours, sentences) is a function of the seed and the image index.
        dataset: folder name, `refcoco` by default so the default DataModule arguments apply.
        size: `(H, W)` of every image.
    """
    root = Path(root)
    height, width = size
    image_dir = root / "images/mscoco/images/train2014"
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / dataset).mkdir(parents=True, exist_ok=True)
    ch, cw = height // 2, width // 2  # 2x2 grid cells: shapes in different cells never overlap

    images, annotations, refs = [], [], []
    ann_id, ref_id, sent_id = 1, 0, 0
    for index in range(num_images):
        rng = random.Random(seed * 1_000_003 + index)  # per image: adding images keeps earlier ones
        image_id = index + 1
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        background = tuple(rng.randint(200, 255) for _ in range(3))
        canvas = Image.new("RGB", (width, height), background)
        cells = sorted(rng.sample(range(4), rng.randint(2, 4)))
        colours = rng.sample(sorted(COLOURS), len(cells))
        for k, (cell, colour) in enumerate(zip(cells, colours)):
            row, col = divmod(cell, 2)
            x0, y0 = col * cw, row * ch
            multipart = index == MULTIPART_INDEX and k == 0
            shape = "square" if multipart else rng.choice(["circle", "square", "triangle"])
            extent = rng.randint(14, min(ch, cw) - 6)
            ox = x0 + 3 + rng.randint(0, cw - extent - 6)
            oy = y0 + 3 + rng.randint(0, ch - extent - 6)
            if multipart:  # two overlapping rectangles sharing a quarter of their area
                pw, ph = int((cw - 8) * 0.6), int((ch - 8) * 0.6)
                a, b = x0 + 4, y0 + 4
                polygons = [_rect(a, b, pw, ph), _rect(a + pw // 2, b + ph // 2, pw, ph)]
            elif shape == "circle":
                polygons = [_circle(ox + extent / 2, oy + extent / 2, extent / 2)]
            elif shape == "square":
                polygons = [_rect(ox, oy, extent, extent)]
            else:
                polygons = [[ox + extent / 2, oy, ox + extent, oy + extent, ox, oy + extent]]
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
            mask = decode_rle(rle)  # [H, W] uint8: what the reader will rasterise (union)
            canvas.paste(COLOURS[colour], mask=Image.fromarray(mask * 255))
            crowd = index == RLE_INDEX and k == 0
            if crowd:  # compressed RLE, counts as str so that it is JSON
                coded = mask_utils.encode(np.asfortranarray(mask))
                segmentation: object = {"size": [height, width], "counts": coded["counts"].decode("ascii")}
            else:
                segmentation = polygons
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": _CATEGORY_ID[shape],
                "segmentation": segmentation, "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": int(crowd),
            })
            word = "grey" if index == GRAYSCALE_INDEX else colour
            texts = (
                [f"two overlapping {word} squares", f"the {word} shape made of two squares"]
                if multipart
                else _sentences(rng, word, shape, "left" if col == 0 else "right",
                                "top" if row == 0 else "bottom", "small" if extent < 24 else "big")
            )
            sentences = []
            for text in texts:
                sent = text.lower()
                sentences.append({"raw": text, "sent": sent, "tokens": sent.split(), "sent_id": sent_id})
                sent_id += 1
            refs.append({
                "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id,
                "category_id": _CATEGORY_ID[shape], "split": SPLIT_CYCLE[index % len(SPLIT_CYCLE)],
                "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
                "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            })
            ann_id += 1
            ref_id += 1
        if index == GRAYSCALE_INDEX:
            canvas = canvas.convert("L")
        canvas.save(image_dir / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})

    with open(root / dataset / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    # The refs file is written last, atomically: its presence means the dataset is complete.
    refs_file = root / dataset / "refs(unc).p"
    tmp = refs_file.with_suffix(f".p.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    os.replace(tmp, refs_file)
    return root


class ToyReferDataModule(ReferDataModule):
    """`ReferDataModule` over the toy dataset, written to `root` on first use.

    The dataset is named `toy` (`<root>/toy/refs(unc).p`), so the RefCOCO published-count check
    does not apply to it. An existing dataset is reused as is (delete `root` to regenerate with
    another `num_images` or `seed`).
    """

    def __init__(
        self,
        root: str = "outputs/toy-data",
        num_images: int = 8,
        seed: int = 0,
        split: str = "val",
        batch_size: int = 2,
        num_workers: int = 0,
        limit: int | None = None,
        group_by_size: bool = False,
    ) -> None:
        super().__init__(
            root=root, dataset="toy", split_by="unc", split=split, image_root=None,
            batch_size=batch_size, num_workers=num_workers, gt_mask_rule="union", limit=limit,
            group_by_size=group_by_size,
        )
        self.num_images, self.seed = num_images, seed

    def prepare_data(self) -> None:
        if not (Path(self.root) / "toy" / "refs(unc).p").is_file():
            write_toy_refer(self.root, num_images=self.num_images, seed=self.seed, dataset="toy")
        super().prepare_data()
