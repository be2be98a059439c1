"""The toy generator writes the official REFER format, deterministically, with its edge cases."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from copatch.datamodules.refer import decode_rle
from copatch.datamodules.toy import SPLIT_CYCLE, ToyReferDataModule, write_toy_refer
from copatch.types import ImageSample

REF_KEYS = {"ref_id", "ann_id", "image_id", "category_id", "split", "sent_ids", "sentences", "file_name"}
SENTENCE_KEYS = {"raw", "sent", "tokens", "sent_id"}
ANN_KEYS = {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
IMAGE_DIR = Path("images/mscoco/images/train2014")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], dict]:
    root = write_toy_refer(tmp_path_factory.mktemp("toy"))
    with open(root / "refcoco/refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    with open(root / "refcoco/instances.json") as f:
        instances = json.load(f)
    return root, refs, instances


def test_layout_and_keys(toy) -> None:
    root, refs, instances = toy
    assert set(instances) == {"images", "annotations", "categories"}
    assert {c["name"] for c in instances["categories"]} == {"circle", "square", "triangle"}
    assert [im["id"] for im in instances["images"]] == list(range(1, 9))
    anns = {a["id"]: a for a in instances["annotations"]}
    assert len(refs) == len(anns)  # every shape is one ref
    for ref in refs:
        assert set(ref) == REF_KEYS
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        assert 1 <= len(ref["sentences"]) <= 3
        for s in ref["sentences"]:
            assert set(s) == SENTENCE_KEYS
            assert s["sent"] == s["raw"].lower() and s["tokens"] == s["sent"].split()
        ann = anns[ref["ann_id"]]
        assert set(ann) == ANN_KEYS and ann["image_id"] == ref["image_id"]
        assert ann["category_id"] == ref["category_id"]
    sent_ids = [s["sent_id"] for r in refs for s in r["sentences"]]
    assert len(set(sent_ids)) == len(sent_ids)
    for im in instances["images"]:
        path = root / IMAGE_DIR / f"COCO_train2014_{im['id']:012d}.jpg"
        assert im["file_name"] == path.name
        with Image.open(path) as pil:
            assert pil.format == "JPEG" and pil.size == (im["width"], im["height"]) == (128, 96)
        n = sum(a["image_id"] == im["id"] for a in anns.values())
        assert 2 <= n <= 4


def test_splits_by_image(toy) -> None:
    _, refs, _ = toy
    for ref in refs:
        assert ref["split"] == SPLIT_CYCLE[(ref["image_id"] - 1) % len(SPLIT_CYCLE)]
    assert {r["split"] for r in refs} == {"val", "testA", "testB", "train"}


def test_edge_cases_present(toy) -> None:
    root, _, instances = toy
    with Image.open(root / IMAGE_DIR / "COCO_train2014_000000000001.jpg") as pil:
        assert pil.mode == "L"
    first = {}
    for ann in sorted(instances["annotations"], key=lambda a: a["id"]):
        first.setdefault(ann["image_id"], ann)
        if isinstance(ann["segmentation"], list):
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])  # never 4 numbers
    rle = first[2]["segmentation"]
    assert first[2]["iscrowd"] == 1 and isinstance(rle["counts"], str) and rle["size"] == [96, 128]
    parts = first[3]["segmentation"]
    assert len(parts) == 2
    a, b = (decode_rle(mask_utils.frPyObjects([p], 96, 128))[..., 0] for p in parts)
    assert (a & b).sum() > 0 and (a & ~b).sum() > 0  # overlapping, not nested


def test_pixels_agree_with_annotations(toy) -> None:
    """Inside every annotation the pixels carry a shape colour; away from all of them, background."""
    root, _, instances = toy
    for im in instances["images"][1:4]:
        with Image.open(root / IMAGE_DIR / im["file_name"]) as pil:
            pixels = np.asarray(pil.convert("RGB")).astype(int)
        background = pixels[1, 1]  # shapes keep >= 3 px from the cell borders
        union = np.zeros((96, 128), bool)
        for ann in instances["annotations"]:
            if ann["image_id"] != im["id"]:
                continue
            seg = ann["segmentation"]
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, 96, 128)) if isinstance(seg, list) else seg
            m = decode_rle(rle).astype(bool)
            union |= m
            assert np.abs(pixels[m] - background).sum(-1).mean() > 60
        grown = union.copy()  # dilate by 2 px to skip JPEG ringing at the edges
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                grown |= np.roll(np.roll(union, dy, 0), dx, 1)
        assert np.abs(pixels[~grown] - background).sum(-1).max() < 20


def test_deterministic(tmp_path: Path) -> None:
    def files(root: Path) -> list[bytes]:
        return [(root / "refcoco/refs(unc).p").read_bytes(), (root / "refcoco/instances.json").read_bytes()]

    a = files(write_toy_refer(tmp_path / "a", num_images=4, seed=3))
    b = files(write_toy_refer(tmp_path / "b", num_images=4, seed=3))
    c = files(write_toy_refer(tmp_path / "c", num_images=4, seed=4))
    assert a == b and a != c


def test_datamodule_writes_and_batches(tmp_path: Path) -> None:
    root = tmp_path / "toy-data"
    dm = ToyReferDataModule(root=str(root), num_images=8, batch_size=2)
    assert dm.hparams["num_images"] == 8 and dm.hparams["root"] == str(root)
    dm.prepare_data()
    assert (root / "toy/refs(unc).p").is_file()
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert [len(b) for b in batches] == [2, 2, 1]  # 5 val images
    assert all(isinstance(s, ImageSample) for b in batches for s in b)
    stamp = (root / "toy/refs(unc).p").stat().st_mtime_ns
    ToyReferDataModule(root=str(root), num_images=3).prepare_data()  # existing data is reused
    assert (root / "toy/refs(unc).p").stat().st_mtime_ns == stamp
