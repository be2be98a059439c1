"""The demo world as a referring dataset in the REFER format, with stored proposals.

`write_demo_refer(root, num_images, seed)` writes what the refer project's zips plus COCO would
give, so the real reader (`copatch.datamodules.refer.ReferDataset(root, dataset="demo")`) and the
stored-proposal reader (`copatch.proposals.StoredProposals(root / "proposals")`) run unchanged:

    <root>/demo/refs(unc).p                       refs, one per referred object; every sentence has
                                                  the REFER keys (raw, sent, tokens, sent_id) plus
                                                  `kind` (attribute, location, relation, context)
                                                  and `subkind` (the same, with size split off)
    <root>/demo/instances.json                    COCO images / annotations (compressed RLE of the
                                                  VISIBLE mask, iscrowd 0) / categories (shapes);
                                                  each annotation also carries `attributes`
                                                  {colour, size, rgb}
    <root>/images/mscoco/images/train2014/demo_%012d.png
                                                  the images, PNG (lossless, so masks and pixels agree
                                                  exactly), in the folder the REFER reader expects
    <root>/proposals/<image_id>.json              stored proposals: every instance mask plus
                                                  distractors (merged pairs, halves, background
                                                  blobs, dilated instances), in a seeded order

Scenes (`copatch.demo.world.sample_eval_scene`) hold 2-6 objects on a 128 x 128 canvas, some of
them overlapping. Expressions are generated only when they are TRUE and UNAMBIGUOUS in the scene,
checked on the visible masks (box centres for positions, pixel counts for sizes):

- attribute: `the {colour} {shape}` (unique in the scene), `the {shape}` (unique shape), and
  (subkind `size`) `the bigger / smaller {colour} {shape}` between two look-alikes;
- location: `the {colour} {shape} on the left` / `on the right` / `at the top` / `at the bottom`,
  or the same with `the {shape}`, when the description alone is ambiguous;
- relation: `the {shape} left of the {colour} {shape}` / `right of` / `above` / `below`, with the
  target described by its shape, size and shape, or colour and shape, ambiguously on its own;
- context: `the {colour} {shape} next to / near the {colour} {shape}`, twins told apart only by
  the object beside them (no spatial keyword).

The words are the ones the pipeline's spatial rules know (`copatch.text.parsing`): left, right,
above, top, below, bottom, bigger, smaller. Image ids are `1..num_images`; everything about image
`i` depends only on `(seed, i)` and the generator's stream, which no training data uses.

CLI: `python -m copatch.demo.dataset --root outputs/demo-data --num-images 60 --seed 1`.

Demo data written before the images had `.png` names (PNG content under `COCO_train2014_%012d.jpg`)
is renamed in place by `upgrade_demo_images`; `check_demo_files` names anything missing and the fix
(delete the folder: it is rewritten on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils

from copatch.demo import world
from copatch.demo.world import SHAPES, Scene

DATASET = "demo"
IMAGE_DIR = "images/mscoco/images/train2014"  # the REFER reader's default image folder under root
REGENERATE = "delete {root} and run again: the demo data is rewritten on first use (or run " \
             "`python -m copatch.demo.dataset --root {root}`)"
DATASET_STREAM = 303  # the trainer renders from other streams (101: training, 202: its evaluation)
KINDS: tuple[str, ...] = ("attribute", "location", "relation", "context")
CATEGORIES = [{"id": k + 1, "name": shape, "supercategory": "shape"} for k, shape in enumerate(SHAPES)]
CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}
MARGIN = 0.06  # positions must differ by at least this fraction of the canvas to count
SIZE_RATIO = 1.8  # "bigger" / "smaller": the visible areas differ at least this much
NEAR_RATIO = 0.7  # "next to": the target is at most this fraction of the other twins' distance
EXPRESSIONS_PER_IMAGE = 5
PER_KIND = 2  # at most this many expressions of one kind per image


@dataclass(frozen=True)
class Candidate:
    """A true, unambiguous expression about object `target` of a scene."""

    target: int
    text: str
    kind: str
    subkind: str


# -------------------------------------------------------------------------------- expressions
def geometry(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(cx, cy, area)` of each visible mask: tight-box centres and pixel counts."""
    centres = np.array([world.box_centre(m) for m in masks], dtype=np.float64).reshape(-1, 2)
    return centres[:, 0], centres[:, 1], masks.reshape(len(masks), -1).sum(1).astype(np.float64)


def _describe(scene: Scene, how: str, k: int) -> str:
    o = scene.objects[k]
    return {"shape": o.shape, "size shape": f"{o.size} {o.shape}", "colour shape": f"{o.colour} {o.shape}"}[how]


def candidate_expressions(scene: Scene, masks: np.ndarray) -> list[Candidate]:
    """Every expression of the kinds above that is true of exactly one object of `scene`."""
    objs = scene.objects
    n = len(objs)
    cx, cy, area = geometry(masks)
    margin = MARGIN * min(scene.height, scene.width)
    names = [o.name for o in objs]
    shapes = [o.shape for o in objs]
    out: list[Candidate] = []

    def group(how: str, k: int) -> list[int]:
        return [j for j in range(n) if _describe(scene, how, j) == _describe(scene, how, k)]

    # attribute: unique colour + shape, unique shape; size between exactly two look-alikes
    for k, o in enumerate(objs):
        if names.count(o.name) == 1:
            out.append(Candidate(k, f"the {o.colour} {o.shape}", "attribute", "attribute"))
        if shapes.count(o.shape) == 1:
            out.append(Candidate(k, f"the {o.shape}", "attribute", "attribute"))
        twins = group("colour shape", k)
        if len(twins) == 2:
            other = twins[0] if twins[1] == k else twins[1]
            if area[k] >= SIZE_RATIO * area[other]:
                out.append(Candidate(k, f"the bigger {o.colour} {o.shape}", "attribute", "size"))
            if area[other] >= SIZE_RATIO * area[k]:
                out.append(Candidate(k, f"the smaller {o.colour} {o.shape}", "attribute", "size"))

    # location: an ambiguous description plus the extreme position among the look-alikes
    for how in ("colour shape", "shape"):
        for k in range(n):
            members = group(how, k)
            if len(members) < 2:
                continue
            for words, values, sign in (("on the left", cx, 1), ("on the right", cx, -1),
                                        ("at the top", cy, 1), ("at the bottom", cy, -1)):
                order = sorted(members, key=lambda j: sign * values[j])
                if order[0] == k and sign * (values[order[1]] - values[k]) >= margin:
                    out.append(Candidate(k, f"the {_describe(scene, how, k)} {words}", "location", "location"))

    # relation: an ambiguous description, resolved by a clear offset from a unique anchor
    relations = (("left of", cx, cy, 1), ("right of", cx, cy, -1), ("above", cy, cx, 1), ("below", cy, cx, -1))
    for how in ("shape", "size shape", "colour shape"):
        for anchor in range(n):
            if names.count(names[anchor]) != 1:
                continue
            for k in range(n):
                if k == anchor:
                    continue
                members = [j for j in group(how, k) if j != anchor]
                if len(members) < 2:
                    continue
                for words, main, cross, sign in relations:
                    offset = sign * (main[anchor] - main[k])  # > 0: k is on the named side
                    if offset < margin or offset < 0.5 * abs(cross[anchor] - cross[k]):
                        continue
                    if any(sign * (main[anchor] - main[j]) > 0 for j in members if j != k):
                        continue  # another look-alike is on that side too
                    a = objs[anchor]
                    out.append(Candidate(k, f"the {_describe(scene, how, k)} {words} the {a.colour} {a.shape}",
                                         "relation", "relation"))

    # context: twins (same colour and shape) told apart by the object next to one of them
    dist = np.hypot(cx[:, None] - cx[None, :], cy[:, None] - cy[None, :])
    for k in range(n):
        twins = group("colour shape", k)
        if len(twins) < 2:
            continue
        others = [j for j in range(n) if j not in twins]
        for anchor in others:
            if names.count(names[anchor]) != 1:
                continue
            nearest_other = min(others, key=lambda j: dist[k, j])
            if nearest_other != anchor or dist[k, anchor] > 0.5 * scene.width:
                continue
            if all(dist[k, anchor] <= NEAR_RATIO * dist[t, anchor] for t in twins if t != k):
                a = objs[anchor]
                for word in ("next to", "near"):
                    out.append(Candidate(k, f"the {objs[k].colour} {objs[k].shape} {word} the "
                                            f"{a.colour} {a.shape}", "context", "context"))
    return out


def choose_expressions(candidates: list[Candidate], rng: np.random.Generator,
                       count: int = EXPRESSIONS_PER_IMAGE) -> list[Candidate]:
    """Up to `count` distinct expressions, at most `PER_KIND` of a kind, taken round-robin over the
    kinds (rarest kinds first, a random subkind within a kind), so that no kind crowds out the
    others; the `next to` and `near` versions of one expression count as one."""
    queues: dict[str, dict[str, list[Candidate]]] = {}
    for k in rng.permutation(len(candidates)):
        c = candidates[int(k)]
        queues.setdefault(c.kind, {}).setdefault(c.subkind, []).append(c)
    seen: set[str] = set()
    chosen: list[Candidate] = []
    for _ in range(count * len(KINDS)):
        for kind in ("context", "relation", "attribute", "location"):
            subs = [name for name, q in sorted(queues.get(kind, {}).items()) if q]
            if not subs or len(chosen) >= count or sum(c.kind == kind for c in chosen) >= PER_KIND:
                continue
            c = queues[kind][subs[int(rng.integers(len(subs)))]].pop(0)
            key = c.text.replace(" near ", " next to ")
            if key not in seen:
                seen.add(key)
                chosen.append(c)
    return chosen


# ---------------------------------------------------------------------------------- proposals
def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    image = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * radius + 1))
    return np.asarray(image) > 0


def distractor_masks(scene: Scene, masks: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Realistic wrong proposals: unions of two nearby objects, halves of objects, background blobs
    and dilated instances."""
    n, height, width = masks.shape
    cx, cy, _ = geometry(masks)
    out: list[np.ndarray] = []
    if n >= 2:  # merged pairs: each of up to two objects with its nearest neighbour
        dist = np.hypot(cx[:, None] - cx[None, :], cy[:, None] - cy[None, :]) + np.eye(n) * 1e9
        for k in rng.permutation(n)[:2]:
            out.append(masks[k] | masks[int(dist[k].argmin())])
    for k in rng.permutation(n)[:2]:  # partial masks: a half, cut through the box centre
        ys, xs = np.mgrid[0:height, 0:width]
        cut = [xs < cx[k], xs > cx[k], ys < cy[k], ys > cy[k]][int(rng.integers(4))]
        out.append(masks[k] & cut)
    objects = masks.any(0)
    scale = scene.scale
    for _ in range(int(rng.integers(1, 3))):  # background blobs (never on an object)
        rx, ry = rng.uniform(4, 10, size=2) * scale
        bx, by = rng.uniform(0, width), rng.uniform(0, height)
        canvas = Image.new("L", (width, height), 0)
        ImageDraw.Draw(canvas).ellipse([bx - rx, by - ry, bx + rx, by + ry], fill=255)
        out.append((np.asarray(canvas) > 0) & ~objects)
    k = int(rng.integers(n))  # a dilated instance
    out.append(_dilate(masks[k], int(rng.integers(2, 5))))
    return out


def proposal_masks(scene: Scene, masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`[N, H, W] bool`: every instance mask plus non-empty, distinct distractors, shuffled."""
    stack = [m for m in masks]
    keys = {m.tobytes() for m in stack}
    for d in distractor_masks(scene, masks, rng):
        if d.any() and d.tobytes() not in keys:
            keys.add(d.tobytes())
            stack.append(d)
    order = rng.permutation(len(stack))
    return np.stack([stack[k] for k in order])


# -------------------------------------------------------------------------------------- writer
def _rle(mask: np.ndarray) -> dict:
    coded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in coded["size"]], "counts": coded["counts"].decode("ascii")}


def _bbox(mask: np.ndarray) -> list[float]:
    """COCO `[x, y, w, h]` of a non-empty mask (as `pycocotools.mask.toBbox`)."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image `index` (0-based) of the dataset of `seed`."""
    return np.random.default_rng([DATASET_STREAM, seed, index])


def demo_image(seed: int, index: int, size: int = world.EVAL_SIZE) -> tuple[Scene, np.ndarray, np.ndarray,
                                                                              list[Candidate], np.ndarray]:
    """`(scene, image, visible masks, chosen expressions, proposals)` of image `index`; pure in
    `(seed, index, size)`. A scene that admits no expression is drawn again."""
    rng = image_rng(seed, index)
    while True:
        scene, image, masks = world.sample_eval_scene(rng, size)
        chosen = choose_expressions(candidate_expressions(scene, masks), rng)
        if chosen:
            return scene, image, masks, chosen, proposal_masks(scene, masks, rng)


def write_demo_refer(root: str | os.PathLike, num_images: int = 60, seed: int = 1, split: str = "val",
                     size: int = world.EVAL_SIZE) -> Path:
    """Write the demo dataset under `root` (see the module docstring) and return `root`.

    Args:
        root: destination folder.
        num_images: number of images (ids `1..num_images`).
        seed: the dataset's seed; image `i` depends only on `(seed, i)`.
        split: the REFER split name every ref gets (`val`: held out from training by construction).
        size: the square canvas in pixels (the CLIP sees it resized to its 64 px input).
    """
    from copatch.proposals import Proposals, StoredProposals

    root = Path(root)
    image_dir = root / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / DATASET).mkdir(parents=True, exist_ok=True)
    store = StoredProposals(root / "proposals")
    images, annotations, refs = [], [], []
    for index in range(num_images):
        image_id = index + 1
        scene, image, masks, chosen, proposals = demo_image(seed, index, size)
        file_name = image_file_name(image_id)
        Image.fromarray(image).save(image_dir / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "height": scene.height, "width": scene.width})
        ann_ids = []
        for k, (obj, mask) in enumerate(zip(scene.objects, masks)):
            ann_id = image_id * 100 + k
            ann_ids.append(ann_id)
            rle = _rle(mask)
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": CATEGORY_ID[obj.shape],
                "segmentation": rle, "area": float(mask.sum()),
                "bbox": _bbox(mask),
                "iscrowd": 0,
                "attributes": {"colour": obj.colour, "size": obj.size, "rgb": list(obj.rgb)},
            })
        by_target: dict[int, list[Candidate]] = {}
        for c in chosen:
            by_target.setdefault(c.target, []).append(c)
        sent_id = image_id * 100
        for target in sorted(by_target):
            sentences = []
            for c in by_target[target]:
                sentences.append({"raw": c.text, "sent": c.text, "tokens": c.text.split(), "sent_id": sent_id,
                                  "kind": c.kind, "subkind": c.subkind})
                sent_id += 1
            ann_id = ann_ids[target]
            refs.append({
                "ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                "category_id": CATEGORY_ID[scene.objects[target].shape],
                "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
                "file_name": f"demo_{image_id:012d}_{ann_id}.png",
            })
        store.write(image_id, Proposals(torch.from_numpy(proposals)))

    with open(root / DATASET / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES,
                   "info": {"description": "copatch demo world", "seed": seed, "num_images": num_images,
                            "size": size}}, f)
    refs_file = root / DATASET / "refs(unc).p"  # written last, atomically: its presence means complete
    tmp = refs_file.with_suffix(f".p.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    os.replace(tmp, refs_file)
    return root


def image_file_name(image_id: int) -> str:
    """The demo image's file name: PNG content, `.png` name."""
    return f"demo_{image_id:012d}.png"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def upgrade_demo_images(root: str | os.PathLike) -> int:
    """Rename the images of demo data written with PNG content under `.jpg` names to `.png` names,
    updating `instances.json` and the refs; returns how many images were renamed (0: nothing to do).

    Safe to interrupt and rerun: a file already renamed is skipped, and the index files are
    rewritten atomically only after every file is in place.
    """
    root = Path(root)
    instances_file = root / DATASET / "instances.json"
    if not instances_file.is_file():
        return 0
    instances = json.loads(instances_file.read_text())
    old = [im for im in instances["images"] if im["file_name"].endswith(".jpg")]
    if not old:
        return 0
    image_dir = root / IMAGE_DIR
    for im in old:
        src, dst = image_dir / im["file_name"], image_dir / image_file_name(im["id"])
        if src.is_file() and not dst.is_file():
            os.replace(src, dst)
        im["file_name"] = dst.name
    refs_file = root / DATASET / "refs(unc).p"
    if refs_file.is_file():
        with open(refs_file, "rb") as f:
            refs = pickle.load(f)
        for r in refs:
            r["file_name"] = f"demo_{r['image_id']:012d}_{r['ann_id']}.png"
        _atomic_write(refs_file, pickle.dumps(refs, protocol=2))
    _atomic_write(instances_file, json.dumps(instances).encode())
    return len(old)


def check_demo_files(root: str | os.PathLike) -> None:
    """Raise `UserFileNotFound` naming the first missing demo file (index, image or proposals) and the
    demo fix; the REFER reader's own messages would point at the COCO downloads instead."""
    from copatch.errors import UserFileNotFound
    from copatch.proposals import StoredProposals

    root = Path(root)
    store = StoredProposals(root / "proposals")
    fix = REGENERATE.format(root=root)
    for name in ("refs(unc).p", "instances.json"):
        if not (root / DATASET / name).is_file():
            raise UserFileNotFound(f"demo data under {root} is incomplete: {root / DATASET / name} is missing. {fix}")
    try:
        instances = json.loads((root / DATASET / "instances.json").read_text())
        images = [(int(im["id"]), str(im["file_name"])) for im in instances["images"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserFileNotFound(f"demo data file {root / DATASET / 'instances.json'} is unreadable ({err}). "
                               f"{fix}") from err
    for image_id, file_name in images:
        for path in (root / IMAGE_DIR / file_name, store.path(image_id)):
            if not path.is_file():
                raise UserFileNotFound(f"demo data under {root} is incomplete: {path} is missing. {fix}")


def expression_kinds(root: str | os.PathLike, subkinds: bool = False) -> dict[int, str]:
    """`{sent_id: kind}` of the demo dataset under `root` (`subkind` with `subkinds=True`)."""
    with open(Path(root) / DATASET / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    key = "subkind" if subkinds else "kind"
    return {s["sent_id"]: s[key] for r in refs for s in r["sentences"]}


def summary(root: str | os.PathLike) -> dict:
    with open(Path(root) / DATASET / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    sentences = [s for r in refs for s in r["sentences"]]
    return {
        "images": len({r["image_id"] for r in refs}),
        "refs": len(refs),
        "expressions": len(sentences),
        "kinds": dict(sorted(Counter(s["kind"] for s in sentences).items())),
        "subkinds": dict(sorted(Counter(s["subkind"] for s in sentences).items())),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the copatch demo world as a REFER-format dataset "
                                                 "with stored proposals.")
    parser.add_argument("--root", default="outputs/demo-data", help="destination folder")
    parser.add_argument("--num-images", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--split", default="val")
    parser.add_argument("--size", type=int, default=world.EVAL_SIZE, help="square canvas in pixels")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.size < world.BASE_SIZE:
        parser.error(f"--num-images must be >= 1 and --size >= {world.BASE_SIZE}")
    root = write_demo_refer(args.root, args.num_images, args.seed, args.split, args.size)
    print(json.dumps({"root": str(root)} | summary(root), indent=2))
    print(f"Read it with ReferDataset({str(root)!r}, dataset={DATASET!r}, split_by='unc', split={args.split!r}) "
          f"and StoredProposals({str(root / 'proposals')!r}).")


if __name__ == "__main__":
    main()
