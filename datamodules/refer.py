"""RefCOCO / RefCOCO+ / RefCOCOg in the REFER format, one `ImageSample` per image.

Layout (as unzipped from the refer project's `refcoco.zip`, `refcoco+.zip`, `refcocog.zip`):

    <root>/<dataset>/refs(<split_by>).p      pickle: list of refs {ref_id, ann_id, image_id, split,
                                              sent_ids, sentences: [{raw, sent, tokens, sent_id}], ...}
    <root>/<dataset>/instances.json          COCO: images, annotations, categories
    <image_root>/COCO_train2014_%012d.jpg    COCO train2014 (default <root>/images/mscoco/images/train2014)

Only a cheap index is built in `__init__`; images and masks are decoded in `__getitem__`, so the
dataset is light to send to DataLoader workers.
"""

from __future__ import annotations

import json
import logging
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from copatch.datamodules.base import SampleDataModule
from copatch.types import Expression, ImageSample

log = logging.getLogger("copatch")

GtMaskRule = Literal["union", "sum_eq_1"]
BadImage = Literal["raise", "record"]

# Splits of the REFER API per (dataset, split_by); other combinations take the splits in the file.
VALID_SPLITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("refcoco", "unc"): ("val", "testA", "testB", "train"),
    ("refcoco+", "unc"): ("val", "testA", "testB", "train"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}

# Expression counts reported in the literature; a mismatch means an incomplete or different copy.
PUBLISHED_COUNTS: dict[tuple[str, str, str], int] = {
    ("refcoco", "unc", "val"): 10834,
    ("refcoco", "unc", "testA"): 5657,
    ("refcoco", "unc", "testB"): 5095,
    ("refcoco+", "unc", "val"): 10758,
    ("refcoco+", "unc", "testA"): 5726,
    ("refcoco+", "unc", "testB"): 4889,
    ("refcocog", "umd", "val"): 4896,
    ("refcocog", "umd", "test"): 9602,
}

_ANNOTATIONS_HINT = (
    "The REFER annotations come from the refer project (github.com/lichengunc/refer): unzip "
    "refcoco.zip / refcoco+.zip / refcocog.zip into <root>, giving <root>/<dataset>/refs(<split_by>).p "
    "and <root>/<dataset>/instances.json."
)
_IMAGES_HINT = (
    "The images are COCO train2014 (train2014.zip from cocodataset.org): extract them to "
    "<root>/images/mscoco/images/train2014 or pass image_root."
)


def check_split(dataset: str, split_by: str, split: str) -> None:
    """Raise `ValueError` listing the valid splits when `split` is not one of a known dataset's."""
    valid = VALID_SPLITS.get((dataset, split_by))
    if valid is not None and split not in valid:
        raise ValueError(f"Unknown split {split!r} for {dataset}({split_by}); valid splits: {', '.join(valid)}")


def check_refer_files(
    root: str | Path, dataset: str, split_by: str, image_root: str | Path | None = None
) -> tuple[Path, Path, Path]:
    """`(refs file, instances.json, image folder)`; a missing one raises `FileNotFoundError`
    naming the expected path and where the files come from."""
    root = Path(root)
    images = Path(image_root) if image_root is not None else root / "images/mscoco/images/train2014"
    refs_file, instances_file = root / dataset / f"refs({split_by}).p", root / dataset / "instances.json"
    # The demo data (`copatch.demo`) is written by code: its fix is to write it again, not a download.
    demo_hint = (f"This is copatch's demo data: delete {root} and run again to rewrite it, or run "
                 f"`python -m copatch.demo.dataset --root {root}`.") if dataset == "demo" else None
    for path in (refs_file, instances_file):
        if not path.is_file():
            raise FileNotFoundError(f"REFER file not found: {path}. {demo_hint or _ANNOTATIONS_HINT}")
    if not images.is_dir():
        raise FileNotFoundError(f"Image folder not found: {images}. {demo_hint or _IMAGES_HINT}")
    return refs_file, instances_file, images


def select_refs(refs: list[dict], split: str) -> list[dict]:
    """The REFER API's split rule: testA/testB/testC match `split[-1] in ref['split']`, 'test'
    matches `'test' in ref['split']`, anything else (train, val) matches exactly."""
    if split in ("testA", "testB", "testC"):
        return [r for r in refs if split[-1] in r["split"]]
    if split == "test":
        return [r for r in refs if "test" in r["split"]]
    return [r for r in refs if r["split"] == split]


def _fix_polygon(poly: list[float]) -> list[float]:
    # `frPyObjects` reads a list whose first element has exactly 4 numbers as bboxes (and rejects
    # fewer), so a degenerate 1- or 2-point part would hijack the whole annotation. Repeating the
    # last point keeps the same (empty) area while making it a genuine polygon of >= 3 points.
    poly = [float(v) for v in poly]
    while len(poly) < 6:
        poly += poly[-2:]
    return poly


def decode_rle(rle: Any) -> np.ndarray:
    """`pycocotools.mask.decode`, minus the DeprecationWarning that pycocotools 2.0.x raises on
    every call under numpy 2 (harmless; it would flood every run and test log)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle)


def annotation_mask(segmentation: Any, height: int, width: int, rule: GtMaskRule = "union") -> np.ndarray:
    """Rasterise a COCO segmentation (polygons, or RLE with list or string counts) to `[H, W] bool`.

    `rule="union"`: the union of the parts. `rule="sum_eq_1"`: the reference code's mask, the sum of
    the decoded parts `== 1`, so pixels covered by two overlapping polygons are dropped.
    """
    if isinstance(segmentation, list):  # polygons: one RLE per part
        parts = [_fix_polygon(p) for p in segmentation if len(p) >= 2]
        if not parts:
            return np.zeros((height, width), dtype=bool)
        rles = mask_utils.frPyObjects(parts, height, width)
        if rule == "sum_eq_1":
            return decode_rle(rles).astype(np.int64).sum(axis=2) == 1
        return decode_rle(mask_utils.merge(rles)) > 0
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:  # compressed RLE (str from JSON, or bytes)
        rle = segmentation
    return decode_rle(rle) > 0


def load_image(path: Path, height: int, width: int) -> torch.Tensor:
    """`[3, H, W] uint8` RGB of `path` (grayscale converted; no EXIF transpose, since the
    annotations are in stored pixel orientation), checked against the expected size."""
    if not path.is_file():
        raise FileNotFoundError(f"Image not found: {path}. {_IMAGES_HINT}")
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except OSError as e:  # includes UnidentifiedImageError and truncated files
        raise OSError(f"Cannot read image {path} ({e}); replace it with the original COCO file.") from e
    if rgb.size != (width, height):
        raise ValueError(
            f"Image {path} is {rgb.size[1]}x{rgb.size[0]} (HxW) but instances.json says {height}x{width}: "
            "it is not the image the annotations were made on. Put the original, unresized COCO "
            "train2014 image there (or point image_root at the original images)."
        )
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


ImageLoader = Callable[[Path, int, int], torch.Tensor]


def load_image_or_error(path: Path, height: int, width: int,
                        loader: ImageLoader = load_image) -> tuple[torch.Tensor, str | None]:
    """`(loader(path, height, width), None)`, or, when the image is missing, unreadable or not of the
    annotated size, `(black [3, H, W] uint8 image, the error message)`: one bad file must not stop a
    run (the module records the image's expressions as failures, counted as IoU 0; see
    `copatch.failures`)."""
    try:
        return loader(path, height, width), None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return torch.zeros(3, height, width, dtype=torch.uint8), str(err)


def check_on_bad_image(value: str) -> str:
    """`value` if it is a valid `on_bad_image` setting, else a `ValueError` listing them."""
    if value not in ("raise", "record"):
        raise ValueError(f"on_bad_image must be 'raise' or 'record', got {value!r}")
    return value


@dataclass
class _ImageEntry:
    image_id: int
    path: Path
    height: int
    width: int
    expressions: list[Expression]
    target_ann_ids: list[int]  # per expression: the annotation its ref points to
    ann_ids: list[int]  # every annotation of the image, sorted


class ReferDataset(Dataset):
    """One REFER split, one `ImageSample` per image carrying all expressions of the split on it.

    Images are sorted by `image_id`, refs by `ref_id`, sentences keep their order in the ref.
    `targets` is `[E, H, W] bool` (the ref's annotation, once per sentence), `instance_masks` is
    `[A, H, W] bool` (every annotation of the image, sorted by annotation id).

    Args:
        root: folder holding `<dataset>/refs(<split_by>).p` and `<dataset>/instances.json`.
        dataset: `refcoco`, `refcoco+` or `refcocog`.
        split_by: `unc` (refcoco, refcoco+), `umd` or `google` (refcocog).
        split: e.g. `val`, `testA`, `testB`, `test`, `train`.
        image_root: the COCO train2014 images (default `<root>/images/mscoco/images/train2014`).
        gt_mask_rule: `union` of the polygons, or the reference code's `sum_eq_1` (overlaps dropped).
        limit: keep only the first `limit` images (quick runs).
        on_bad_image: what a missing or unreadable image (or one not of the annotated size) does:
            `raise` the error naming the file, or `record` it in the sample (`ImageSample.error`, with a
            black image and the ground truth) so that a run goes on and counts its expressions as
            failures with IoU 0 (see `copatch.failures`). DataModules use `record`.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str = "refcoco",
        split_by: str = "unc",
        split: str = "val",
        image_root: str | Path | None = None,
        gt_mask_rule: GtMaskRule = "union",
        limit: int | None = None,
        on_bad_image: BadImage = "raise",
    ) -> None:
        if gt_mask_rule not in ("union", "sum_eq_1"):
            raise ValueError(f"gt_mask_rule must be 'union' or 'sum_eq_1', got {gt_mask_rule!r}")
        check_split(dataset, split_by, split)  # fail before reading anything
        refs_file, instances_file, images = check_refer_files(root, dataset, split_by, image_root)
        self.gt_mask_rule = gt_mask_rule
        self.on_bad_image = check_on_bad_image(on_bad_image)
        with open(refs_file, "rb") as f:
            all_refs: list[dict] = pickle.load(f)
        refs = sorted(select_refs(all_refs, split), key=lambda r: r["ref_id"])
        if (dataset, split_by) not in VALID_SPLITS and not refs:  # unlisted: the splits the file has
            valid = sorted({r["split"] for r in all_refs})
            raise ValueError(f"Unknown split {split!r} for {dataset}({split_by}); valid splits: "
                             f"{', '.join(valid)}")
        with open(instances_file) as f:
            instances = json.load(f)

        image_ids = {r["image_id"] for r in refs}
        image_info = {im["id"]: im for im in instances["images"] if im["id"] in image_ids}
        # Only this split's annotations are kept: the index stays small in every worker.
        self._segmentations: dict[int, Any] = {}
        anns_of_image: dict[int, list[int]] = {}
        for ann in instances["annotations"]:
            if ann["image_id"] in image_ids:
                self._segmentations[ann["id"]] = ann["segmentation"]
                anns_of_image.setdefault(ann["image_id"], []).append(ann["id"])

        entries: dict[int, _ImageEntry] = {}
        for ref in refs:
            image_id, ann_id = ref["image_id"], ref["ann_id"]
            if image_id not in image_info or ann_id not in self._segmentations:
                raise ValueError(
                    f"ref_id={ref['ref_id']} in {refs_file} names image_id={image_id} / ann_id={ann_id}, "
                    f"not both found in {instances_file}: the two files come from different copies."
                )
            if image_id not in entries:
                info = image_info[image_id]
                path = images / (info.get("file_name") or f"COCO_train2014_{image_id:012d}.jpg")
                ann_ids = sorted(anns_of_image[image_id])
                entries[image_id] = _ImageEntry(image_id, path, info["height"], info["width"], [], [], ann_ids)
            entry = entries[image_id]
            for sentence in ref["sentences"]:
                text = sentence["raw"] if sentence.get("raw") is not None else sentence.get("sent", "")
                # An empty sentence is kept: the module records it as a failure (IoU 0, copatch.failures)
                # and the rest of the split runs.
                entry.expressions.append(Expression(sentence["sent_id"], str(text), ref["ref_id"]))
                entry.target_ann_ids.append(ann_id)

        self.entries = [entries[i] for i in sorted(entries) if entries[i].expressions]
        expected = PUBLISHED_COUNTS.get((dataset, split_by, split))
        if expected is not None and self.num_expressions != expected:
            log.warning(
                "%s(%s) %s has %d expressions but the published count is %d: is %s complete and official?",
                dataset, split_by, split, self.num_expressions, expected, refs_file,
            )
        if limit is not None:
            self.entries = self.entries[:limit]

    @property
    def num_expressions(self) -> int:
        """Number of expressions over all (kept) images."""
        return sum(len(e.expressions) for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def image_sizes(self) -> list[tuple[int, int]]:
        """`(H, W)` of each image, in index order, from the annotations (no image is read)."""
        return [(e.height, e.width) for e in self.entries]

    def _mask(self, ann_id: int, entry: _ImageEntry) -> torch.Tensor:
        m = annotation_mask(self._segmentations[ann_id], entry.height, entry.width, self.gt_mask_rule)
        if m.shape != (entry.height, entry.width):  # an RLE 'size' can disagree with the image entry
            raise ValueError(
                f"Annotation {ann_id} of {entry.path} decodes to {m.shape} but the image is "
                f"{(entry.height, entry.width)}: the instances.json is inconsistent; re-extract it."
            )
        return torch.from_numpy(m)

    def __getitem__(self, index: int) -> ImageSample:
        entry = self.entries[index]
        if self.on_bad_image == "raise":
            image, error = load_image(entry.path, entry.height, entry.width), None
        else:
            image, error = load_image_or_error(entry.path, entry.height, entry.width)
        cache = {a: self._mask(a, entry) for a in entry.ann_ids}
        targets = torch.stack([cache[a] for a in entry.target_ann_ids])  # [E, H, W]
        instances = torch.stack([cache[a] for a in entry.ann_ids])  # [A, H, W]
        if targets.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"Targets {tuple(targets.shape)} do not fit image {tuple(image.shape)}: {entry.path}")
        return ImageSample(
            image_id=entry.image_id,
            image=image,
            expressions=list(entry.expressions),
            targets=targets,
            instance_masks=instances,
            file_name=str(entry.path),
            error=error,
        )


class ReferDataModule(SampleDataModule):
    """Predict-only DataModule over one REFER split; batches are `list[ImageSample]`.

    Args: as `ReferDataset`, plus `batch_size` (images per batch), `num_workers` and `group_by_size`
    (`SampleDataModule`: batches of one model input size).
    A bad image does not stop a run: the dataset records it (`on_bad_image="record"`).
    """

    def __init__(
        self,
        root: str,
        dataset: str = "refcoco",
        split_by: str = "unc",
        split: str = "val",
        image_root: str | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        gt_mask_rule: str = "union",
        limit: int | None = None,
        group_by_size: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, group_by_size)
        if gt_mask_rule not in ("union", "sum_eq_1"):  # fail at config time, not in setup
            raise ValueError(f"gt_mask_rule must be 'union' or 'sum_eq_1', got {gt_mask_rule!r}")
        check_split(dataset, split_by, split)
        self.save_hyperparameters()
        self.root, self.dataset_name, self.split_by, self.split = root, dataset, split_by, split
        self.image_root, self.gt_mask_rule, self.limit = image_root, gt_mask_rule, limit

    def prepare_data(self) -> None:
        check_refer_files(self.root, self.dataset_name, self.split_by, self.image_root)

    def build_dataset(self) -> ReferDataset:
        return ReferDataset(
            self.root, self.dataset_name, self.split_by, self.split, self.image_root,
            self.gt_mask_rule, self.limit, "record",  # type: ignore[arg-type]
        )
