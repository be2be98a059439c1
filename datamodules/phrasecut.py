"""PhraseCut (VGPhraseCut v0) in its official format, one `ImageSample` per image.

Layout (as `download_dataset.py` of github.com/ChenyunWu/PhraseCutDataset writes it, run in a clone of
that repository; `root` is the clone, i.e. the folder holding `data/VGPhraseCut_v0`):

    <root>/data/VGPhraseCut_v0/refer_<split>.json       JSON list of tasks {task_id, image_id, ann_ids,
                                                         instance_boxes, Polygons: [instance][polygon][[x, y], ...],
                                                         phrase, phrase_structure}
    <root>/data/VGPhraseCut_v0/image_data_split.json    JSON list of {image_id, width, height, split, ...}
    <image_root>/<image_id>.jpg                          Visual Genome images (default
                                                         <root>/data/VGPhraseCut_v0/images)

Splits: `train`, `val`, `test`, `miniv`, and `val_miniv` (the official way to name the whole validation
set: the `val` files leave out the 100 `miniv` images). As in the official loader, a split joined by
`_` reads every named file and keeps images whose `image_data_split.json` split is one of them.

Ground truth per task (phrase) is the union of all its instances' polygons, rasterised exactly as the
official `utils/data_transfer.py::polygons_to_mask` (which the official evaluator uses): PIL
`ImageDraw.polygon(points, outline=1, fill=1)` on an `L` image of the image's `(width, height)`, with
`int()`-cast coordinates (truncation towards zero), polygons of fewer than 2 points skipped.

Order (deterministic; the official `RefVGLoader` shuffles its images): images sorted by `image_id`,
tasks of an image in file order (the order of the official `get_img_ref_data(img_id)['task_ids']`).

`instance_masks` holds the distinct instances of all the image's tasks, in order of first appearance:
tasks often share an instance (the same Visual Genome object in two phrases), so instances with
identical rasterisation input (the same int-cast, non-degenerate polygons) are kept once, and an
instance that rasterises to nothing (only degenerate polygons) is left out. They are what the oracle
`GroundTruthProposals` proposes; every task's target is the union of some of them.

Only a cheap index is built in `__init__`; images and masks are decoded in `__getitem__`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from copatch.datamodules.base import SampleDataModule
from copatch.datamodules.refer import BadImage, check_on_bad_image, load_image, load_image_or_error
from copatch.types import Expression, ImageSample

log = logging.getLogger("copatch")

DATASET_DIR = Path("data/VGPhraseCut_v0")
SPLITS: tuple[str, ...] = ("train", "val", "test", "miniv", "val_miniv")

# (phrases, images) from the PhraseCutDataset README; a mismatch means an incomplete or different copy.
PUBLISHED_COUNTS: dict[str, tuple[int, int]] = {
    "train": (310816, 71746),
    "val": (20316, 2971),
    "test": (14354, 2545),
    "miniv": (821, 100),
    "val_miniv": (20316 + 821, 2971 + 100),
}

_HINT = (
    "PhraseCut comes from github.com/ChenyunWu/PhraseCutDataset: in a clone of that repository run "
    "`python download_dataset.py -s <split>` (e.g. `-s test`, `-s val_miniv`), which writes "
    "data/VGPhraseCut_v0/{refer_<split>.json, image_data_split.json, images/<image_id>.jpg}; pass the "
    "clone as root."
)
_IMAGES_HINT = (
    "The images are Visual Genome images named <image_id>.jpg: `python download_dataset.py -s <split>` "
    "fetches them into data/VGPhraseCut_v0/images, or point image_root at a folder of Visual Genome "
    "(v1.2, parts 1 and 2) images."
)
_TASK_KEYS = ("task_id", "image_id", "Polygons", "phrase")


def check_split(split: str) -> None:
    """Raise `ValueError` listing the valid splits when `split` is not a PhraseCut split."""
    if split not in SPLITS:
        raise ValueError(f"Unknown PhraseCut split {split!r}; valid splits: {', '.join(SPLITS)}")


def check_phrasecut_files(
    root: str | Path, split: str, image_root: str | Path | None = None
) -> tuple[list[Path], Path, Path]:
    """`(refer files of the split, image_data_split.json, image folder)`; a missing one raises
    `FileNotFoundError` naming the expected path and where PhraseCut comes from."""
    check_split(split)
    data = Path(root) / DATASET_DIR
    refer_files = [data / f"refer_{s}.json" for s in split.split("_")]
    info_file = data / "image_data_split.json"
    for path in (*refer_files, info_file):
        if not path.is_file():
            raise FileNotFoundError(f"PhraseCut file not found: {path}. {_HINT}")
    images = Path(image_root) if image_root is not None else data / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"PhraseCut image folder not found: {images}. {_IMAGES_HINT}")
    return refer_files, info_file, images


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"Cannot parse {path} ({e}): the download is incomplete; fetch it again. {_HINT}") from e


def int_polygon(polygon: Sequence[Sequence[float]]) -> np.ndarray | None:
    """`[N, 2] int32` points of one polygon, `int()`-cast (truncated towards zero) as the official
    `polygons_to_mask` does, or None for a polygon of fewer than 2 points.

    The official code skips those (`if len(polygon) < 2: continue`); PIL would raise on a single
    point ("coordinate list must contain at least 2 coordinates"). A 2-point polygon is kept: PIL
    draws it as a line, and so does the official code.
    """
    if len(polygon) < 2:
        return None
    points = np.asarray(polygon, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"a polygon must be a list of [x, y] points, got an array of shape {points.shape}")
    return np.trunc(points).astype(np.int32)


def polygons_mask(polygons: Sequence[Any], height: int, width: int) -> np.ndarray:
    """`[H, W] bool` union of `polygons` (each a list of `[x, y]` or an `[N, 2]` array), rasterised as
    the official `polygons_to_mask(polygons, w, h)`: PIL `polygon(outline=1, fill=1)` on an `L` image.

    The official code draws each polygon on its own image and sums; drawing all of them on one image
    gives the same union (a draw only ever sets pixels to 1).
    """
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        points = int_polygon(polygon)
        if points is None:
            continue
        draw.polygon(points.ravel().tolist(), outline=1, fill=1)
    return np.asarray(canvas) > 0


Instance = tuple[np.ndarray, ...]  # the non-degenerate, int-cast polygons of one instance


def _instance_key(instance: Instance) -> tuple[bytes, ...]:
    return tuple(p.tobytes() for p in instance)


@dataclass
class _ImageEntry:
    image_id: int
    path: Path
    height: int
    width: int
    expressions: list[Expression]
    task_instances: list[list[Instance]]  # per expression: its instances


def load_phrasecut_image(path: Path, height: int, width: int) -> torch.Tensor:
    """`[3, H, W] uint8` RGB of `path` (refer.py's `load_image`), with PhraseCut's error messages."""
    if not path.is_file():
        raise FileNotFoundError(f"PhraseCut image not found: {path}. {_IMAGES_HINT}")
    try:
        return load_image(path, height, width)
    except ValueError as e:  # the size check; load_image's message speaks of COCO's instances.json
        with Image.open(path) as im:
            actual_w, actual_h = im.size
        raise ValueError(
            f"Image {path} is {actual_h}x{actual_w} (HxW) but image_data_split.json says {height}x{width}: "
            f"it is not the image the polygons were drawn on. Put the original Visual Genome image there "
            f"(or point image_root at the original images)."
        ) from e
    except OSError as e:  # unreadable or truncated file
        raise OSError(f"Cannot read PhraseCut image {path} ({e}); download it again. {_IMAGES_HINT}") from e


class PhraseCutDataset(Dataset):
    """One PhraseCut split, one `ImageSample` per image carrying all tasks (phrases) on it.

    `Expression.id` is the task's `task_id` (a string: the official evaluator reads `<task_id>.png`),
    `text` its `phrase`, `ref_id` None. `targets` is `[E, H, W] bool` (union of each task's instances),
    `instance_masks` `[A, H, W] bool` (the image's distinct, non-empty instances). See the module
    docstring for the order and the rasterisation.

    Args:
        root: the PhraseCutDataset clone, holding `data/VGPhraseCut_v0/`.
        split: `train`, `val`, `test`, `miniv` or `val_miniv`.
        image_root: the `<image_id>.jpg` images (default `<root>/data/VGPhraseCut_v0/images`).
        limit: keep only the first `limit` images (quick runs).
        on_bad_image: what a missing or unreadable image (or one not of the annotated size) does:
            `raise` the error naming the file, or `record` it in the sample (`ImageSample.error`, with a
            black image and the ground truth) so that a run goes on and counts its expressions as
            failures with IoU 0 (see `copatch.failures`). DataModules use `record`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        image_root: str | Path | None = None,
        limit: int | None = None,
        on_bad_image: BadImage = "raise",
    ) -> None:
        refer_files, info_file, images = check_phrasecut_files(root, split, image_root)
        self.on_bad_image = check_on_bad_image(on_bad_image)
        splits = set(split.split("_"))
        info = {im["image_id"]: im for im in _read_json(info_file)}

        entries: dict[int, _ImageEntry] = {}
        seen_task_ids: dict[str, Path] = {}
        for refer_file in refer_files:
            for task in _read_json(refer_file):
                missing = [k for k in _TASK_KEYS if k not in task]
                if missing:
                    raise ValueError(
                        f"Task {task.get('task_id')!r} in {refer_file} has no {', '.join(missing)}: use the "
                        "refer_<split>.json files (refer_input_<split>.json have no ground truth)."
                    )
                task_id, image_id = str(task["task_id"]), task["image_id"]
                if task_id in seen_task_ids:
                    raise ValueError(f"Duplicate task_id={task_id} in {refer_file} (also in "
                                     f"{seen_task_ids[task_id]}): outputs are keyed by task_id.")
                seen_task_ids[task_id] = refer_file
                phrase = task["phrase"]
                if not isinstance(phrase, str):  # a malformed file; an empty phrase is a recorded failure
                    raise ValueError(f"The phrase of task_id={task_id} in {refer_file} is not a string "
                                     f"({type(phrase).__name__}). Fix or remove that task.")
                image = info.get(image_id)
                if image is None or image.get("split") not in splits:
                    where = "is not listed" if image is None else f"is listed with split {image.get('split')!r}"
                    raise ValueError(
                        f"task_id={task_id} in {refer_file} is on image_id={image_id}, which {where} in "
                        f"{info_file} (expected split {split!r}): the files come from different copies."
                    )
                try:
                    instances = [tuple(p for p in map(int_polygon, polys) if p is not None)
                                 for polys in task["Polygons"]]
                except (ValueError, TypeError) as e:
                    raise ValueError(f"Bad Polygons of task_id={task_id} in {refer_file}: {e}") from e
                if image_id not in entries:
                    entries[image_id] = _ImageEntry(image_id, images / f"{image_id}.jpg", int(image["height"]),
                                                    int(image["width"]), [], [])
                entries[image_id].expressions.append(Expression(task_id, phrase))
                entries[image_id].task_instances.append(instances)

        self.split = split
        self.entries = [entries[i] for i in sorted(entries)]
        expected = PUBLISHED_COUNTS.get(split)
        if expected is not None and (self.num_expressions, len(self.entries)) != expected:
            log.warning(
                "PhraseCut %s has %d phrases on %d images but the published counts are %d phrases on %d "
                "images: is %s complete and official?",
                split, self.num_expressions, len(self.entries), *expected, refer_files[0].parent,
            )
        if limit is not None:
            self.entries = self.entries[:limit]

    @property
    def num_expressions(self) -> int:
        """Number of tasks (phrases) over all (kept) images."""
        return sum(len(e.expressions) for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def image_sizes(self) -> list[tuple[int, int]]:
        """`(H, W)` of each image, in index order, from the annotations (no image is read)."""
        return [(e.height, e.width) for e in self.entries]

    def __getitem__(self, index: int) -> ImageSample:
        entry = self.entries[index]
        if self.on_bad_image == "raise":
            image, error = load_phrasecut_image(entry.path, entry.height, entry.width), None
        else:
            image, error = load_image_or_error(entry.path, entry.height, entry.width, load_phrasecut_image)
        cache: dict[tuple[bytes, ...], np.ndarray] = {}  # distinct instances, in order of first appearance
        targets = np.zeros((len(entry.expressions), entry.height, entry.width), dtype=bool)
        for target, instances in zip(targets, entry.task_instances):
            for instance in instances:
                key = _instance_key(instance)
                if key not in cache:
                    cache[key] = polygons_mask(instance, entry.height, entry.width)
                target |= cache[key]
        kept = [m for m in cache.values() if m.any()]
        instance_masks = np.stack(kept) if kept else np.zeros((0, entry.height, entry.width), dtype=bool)
        return ImageSample(
            image_id=entry.image_id,
            image=image,
            expressions=list(entry.expressions),
            targets=torch.from_numpy(targets),
            instance_masks=torch.from_numpy(instance_masks),
            file_name=str(entry.path),
            error=error,
        )


class PhraseCutDataModule(SampleDataModule):
    """Predict-only DataModule over one PhraseCut split; batches are `list[ImageSample]`.

    Args: as `PhraseCutDataset`, plus `batch_size` (images per batch), `num_workers` and `group_by_size`
    (`SampleDataModule`: batches of one model input size).
    A bad image does not stop a run: the dataset records it (`on_bad_image="record"`).
    """

    def __init__(
        self,
        root: str,
        split: str = "test",
        image_root: str | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        limit: int | None = None,
        group_by_size: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, group_by_size)
        check_split(split)  # fail at config time, not in setup
        self.save_hyperparameters()
        self.root, self.split, self.image_root, self.limit = root, split, image_root, limit

    def prepare_data(self) -> None:
        check_phrasecut_files(self.root, self.split, self.image_root)

    def build_dataset(self) -> PhraseCutDataset:
        return PhraseCutDataset(self.root, self.split, self.image_root, self.limit, on_bad_image="record")
