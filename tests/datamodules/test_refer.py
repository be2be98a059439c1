"""The REFER reader on the toy dataset, checked against the pickle and independent rasterisations."""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from copatch.datamodules.refer import ReferDataModule, ReferDataset, annotation_mask, select_refs
from copatch.datamodules.toy import write_toy_refer
from copatch.types import ImageSample

H, W = 96, 128
IMAGE_DIR = Path("images/mscoco/images/train2014")


def _load(root: Path) -> tuple[list[dict], dict]:
    with open(root / "refcoco/refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    with open(root / "refcoco/instances.json") as f:
        return refs, json.load(f)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], dict]:
    root = write_toy_refer(tmp_path_factory.mktemp("toy"))
    return (root, *_load(root))


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A fresh 3-image toy copy for tests that damage it (images 1-3 are all 'val')."""
    return write_toy_refer(tmp_path / "data", num_images=3)


def _rect_mask(poly: list[float]) -> np.ndarray:
    """Exact raster of an axis-aligned integer rectangle: pixel centres inside it."""
    xs, ys = poly[0::2], poly[1::2]
    m = np.zeros((H, W), bool)
    m[int(min(ys)) : int(max(ys)), int(min(xs)) : int(max(xs))] = True
    return m


def _pil_mask(parts: list[list[float]]) -> np.ndarray:
    canvas = Image.new("1", (W, H), 0)
    for p in parts:
        ImageDraw.Draw(canvas).polygon(list(zip(p[0::2], p[1::2])), fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def _decode_coco_string(counts: str, h: int, w: int) -> tuple[np.ndarray, list[int]]:
    """Our own decoder of COCO's compressed RLE string (5-bit groups, deltas from counts[i-2])."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            c = ord(counts[pos]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos, shift = pos + 1, shift + 5
            if not more and c & 0x10:
                value |= -1 << shift
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
    flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool)
    return flat.reshape(w, h).T, runs  # column-major


def test_counts_per_split(toy) -> None:
    root, refs, _ = toy
    for split in ("val", "testA", "testB", "train"):
        chosen = [r for r in refs if r["split"] == split]
        ds = ReferDataset(root, split=split)
        assert len(ds) == len({r["image_id"] for r in chosen}) > 0
        assert ds.num_expressions == sum(len(r["sentences"]) for r in chosen)
    assert len(ReferDataset(root, split="val", limit=2)) == 2


def test_split_rule() -> None:
    refs = [{"split": s} for s in ("train", "val", "testA", "testB", "test", "testC")]
    assert [r["split"] for r in select_refs(refs, "testA")] == ["testA"]
    assert [r["split"] for r in select_refs(refs, "test")] == ["testA", "testB", "test", "testC"]
    assert [r["split"] for r in select_refs(refs, "val")] == ["val"]


def test_ids_text_and_order(toy) -> None:
    root, refs, instances = toy
    ds = ReferDataset(root, split="val")
    val = sorted((r for r in refs if r["split"] == "val"), key=lambda r: r["ref_id"])
    image_ids = sorted({r["image_id"] for r in val})
    assert [e.image_id for e in ds.entries] == image_ids
    for i, image_id in enumerate(image_ids):
        sample = ds[i]
        on_image = [r for r in val if r["image_id"] == image_id]
        expected = [(s["sent_id"], s["raw"], r["ref_id"]) for r in on_image for s in r["sentences"]]
        assert [(e.id, e.text, e.ref_id) for e in sample.expressions] == expected
        assert sample.image_id == image_id and sample.file_name.endswith(f"COCO_train2014_{image_id:012d}.jpg")
        ann_ids = sorted(a["id"] for a in instances["annotations"] if a["image_id"] == image_id)
        assert sample.instance_masks.shape == (len(ann_ids), H, W) and sample.instance_masks.dtype == torch.bool
        assert sample.targets.shape == (len(expected), H, W) and sample.targets.dtype == torch.bool
        ref_of = {r["ref_id"]: r["ann_id"] for r in val}
        for e, target in zip(sample.expressions, sample.targets):
            assert torch.equal(target, sample.instance_masks[ann_ids.index(ref_of[e.ref_id])])
    again = ReferDataset(root, split="val")
    def order(d: ReferDataset) -> list[list[int | str]]:
        return [[e.id for e in x.expressions] for x in d.entries]

    assert order(again) == order(ds)


def test_grayscale_image_is_rgb(toy) -> None:
    sample = ReferDataset(toy[0], split="val")[0]
    assert sample.image_id == 1 and sample.image.shape == (3, H, W) and sample.image.dtype == torch.uint8
    assert torch.equal(sample.image[0], sample.image[1]) and torch.equal(sample.image[1], sample.image[2])
    assert sample.size == (H, W)


def test_masks_against_independent_rasters(toy) -> None:
    root, refs, instances = toy
    anns = {a["id"]: a for a in instances["annotations"]}
    checked = {"square": 0, "other": 0}
    for split in ("val", "testA", "testB", "train"):
        ds = ReferDataset(root, split=split)
        for i in range(len(ds)):
            sample = ds[i]
            ann_of = {r["ref_id"]: r["ann_id"] for r in refs}
            for e, target in zip(sample.expressions, sample.targets.numpy()):
                ann = anns[ann_of[e.ref_id]]
                assert target.sum() == ann["area"]
                seg = ann["segmentation"]
                if not isinstance(seg, list) or len(seg) != 1:
                    continue
                if ann["category_id"] == 2:  # integer rectangles rasterise exactly
                    np.testing.assert_array_equal(target, _rect_mask(seg[0]))
                    checked["square"] += 1
                else:  # PIL draws boundaries differently: compare by IoU
                    ref = _pil_mask(seg)
                    assert (target & ref).sum() / (target | ref).sum() > 0.8
                    checked["other"] += 1
    assert checked["square"] > 0 and checked["other"] > 0


def test_multipart_union_vs_sum_eq_1(toy) -> None:
    root, refs, instances = toy
    ann = next(a for a in instances["annotations"] if a["image_id"] == 3 and len(a["segmentation"]) == 2)
    a, b = (_rect_mask(p) for p in ann["segmentation"])
    union, sum1 = (ReferDataset(root, split="val", gt_mask_rule=rule) for rule in ("union", "sum_eq_1"))
    idx = [e.image_id for e in union.entries].index(3)
    ref_ids = {r["ref_id"] for r in refs if r["ann_id"] == ann["id"]}
    su, s1 = union[idx], sum1[idx]
    rows = [k for k, e in enumerate(su.expressions) if e.ref_id in ref_ids]
    assert rows
    for k in rows:
        np.testing.assert_array_equal(su.targets[k].numpy(), a | b)
        np.testing.assert_array_equal(s1.targets[k].numpy(), a ^ b)
        assert (su.targets[k] & ~s1.targets[k]).sum() == (a & b).sum() > 0  # differ exactly on the overlap
    others = [k for k in range(len(su.expressions)) if k not in rows]
    assert torch.equal(su.targets[others], s1.targets[others])  # single-part masks are the same


def test_rle_annotation(toy, tmp_path: Path) -> None:
    root, refs, instances = toy
    ann = next(a for a in instances["annotations"] if isinstance(a["segmentation"], dict))
    expected, runs = _decode_coco_string(ann["segmentation"]["counts"], H, W)
    assert expected.sum() == ann["area"] > 0
    for rule in ("union", "sum_eq_1"):
        np.testing.assert_array_equal(annotation_mask(ann["segmentation"], H, W, rule), expected)
    uncompressed = {"size": [H, W], "counts": runs}
    np.testing.assert_array_equal(annotation_mask(uncompressed, H, W), expected)
    ds = ReferDataset(root, split="val")
    sample = ds[[e.image_id for e in ds.entries].index(ann["image_id"])]
    ref_ids = {r["ref_id"] for r in refs if r["ann_id"] == ann["id"]}
    k = next(k for k, e in enumerate(sample.expressions) if e.ref_id in ref_ids)
    np.testing.assert_array_equal(sample.targets[k].numpy(), expected)


def test_four_number_polygon_is_not_a_bbox() -> None:
    square = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]
    for rule in ("union", "sum_eq_1"):
        m = annotation_mask([[5.0, 5.0, 60.0, 60.0], square], H, W, rule)  # a 2-point part first
        np.testing.assert_array_equal(m, _rect_mask(square))


def test_published_count_warning(toy, caplog: pytest.LogCaptureFixture) -> None:
    root, refs, _ = toy
    n = sum(len(r["sentences"]) for r in refs if r["split"] == "val")
    with caplog.at_level(logging.WARNING, logger="copatch"):
        ReferDataset(root, split="val")
    messages = [r.getMessage() for r in caplog.records if r.name == "copatch"]
    assert any("10834" in m and f" {n} " in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="copatch"):
        ReferDataset(root, split="train")  # no published count for train: silent
    assert not [r for r in caplog.records if r.name == "copatch"]


# ---- errors ---------------------------------------------------------------------------------------


def test_missing_files(small: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"refs\(unc\)\.p") as err:
        ReferDataset(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "refcoco" / "refs(unc).p") in str(err.value)
    assert "refcoco.zip" in str(err.value)
    with pytest.raises(FileNotFoundError, match="refs\\(umd\\)"):
        ReferDataModule(str(small), dataset="refcoco", split_by="umd").prepare_data()
    with pytest.raises(FileNotFoundError, match="train2014"):
        ReferDataset(small, image_root=tmp_path / "no-images")
    (small / "refcoco/instances.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances.json"):
        ReferDataset(small)


def test_unknown_split_lists_valid_ones(small: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val, testA, testB, train"):
        ReferDataset(small, split="test")
    with pytest.raises(ValueError, match="val, testA, testB, train"):
        ReferDataModule(str(small), split="testC")  # at config time
    with pytest.raises(ValueError, match="train, val, test"):
        ReferDataModule(str(small), dataset="refcocog", split_by="umd", split="testA")
    other = write_toy_refer(tmp_path / "other", num_images=4, dataset="refclef")
    with pytest.raises(ValueError, match="testA, val"):  # unlisted dataset: the splits in its file
        ReferDataset(other, dataset="refclef", split="nope")
    assert len(ReferDataset(other, dataset="refclef", split="testA")) == 1
    with pytest.raises(ValueError, match="gt_mask_rule"):
        ReferDataModule(str(small), gt_mask_rule="sum")


def test_missing_image(small: Path) -> None:
    path = small / IMAGE_DIR / "COCO_train2014_000000000002.jpg"
    path.unlink()
    ds = ReferDataset(small)  # construction only indexes
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        ds[1]


def test_corrupt_image(small: Path) -> None:
    path = small / IMAGE_DIR / "COCO_train2014_000000000002.jpg"
    path.write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(OSError, match=re.escape(str(path))):
        ReferDataset(small)[1]


def test_image_size_mismatch(small: Path) -> None:
    path = small / IMAGE_DIR / "COCO_train2014_000000000003.jpg"
    with Image.open(path) as pil:
        pil.resize((64, 48)).save(path)
    with pytest.raises(ValueError, match="48x64") as err:
        ReferDataset(small)[2]
    assert str(path) in str(err.value) and f"{H}x{W}" in str(err.value) and "original" in str(err.value)


def test_an_empty_expression_is_kept_for_the_module_to_record(small: Path) -> None:
    # The split is not stopped: the sentence reaches the module, which records it as a failure
    # (tests/test_bad_input.py runs that end to end).
    refs, _ = _load(small)
    refs[1]["sentences"][0]["raw"] = "  "
    sent_id = refs[1]["sentences"][0]["sent_id"]
    with open(small / "refcoco/refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    texts = {e.id: e.text for entry in ReferDataset(small).entries for e in entry.expressions}
    assert texts[sent_id] == "  "


# ---- DataModule -----------------------------------------------------------------------------------


def test_datamodule_predict_dataloader(toy) -> None:
    root = toy[0]
    dm = ReferDataModule(str(root), batch_size=2, num_workers=2)
    assert dm.hparams["batch_size"] == 2 and dm.hparams["split"] == "val"
    dm.prepare_data()
    batches = list(dm.predict_dataloader())  # (the base's behaviour: tests/datamodules/test_base.py)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert all(isinstance(s, ImageSample) for b in batches for s in b)
    assert [s.image_id for b in batches for s in b] == [e.image_id for e in dm.dataset.entries]
    limited = ReferDataModule(str(root), batch_size=3, limit=4)
    assert [len(b) for b in limited.predict_dataloader()] == [3, 1]


def test_trainer_predict(toy) -> None:
    """The batches survive Lightning's device transfer as lists of `ImageSample`."""
    import lightning as L

    class Echo(L.LightningModule):
        def predict_step(self, batch: list[ImageSample], batch_idx: int) -> list[int]:
            assert all(isinstance(s, ImageSample) and s.targets.shape[0] == len(s.expressions) for s in batch)
            return [e.id for s in batch for e in s.expressions]

    dm = ReferDataModule(str(toy[0]), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    out = trainer.predict(Echo(), datamodule=dm)
    val = sorted((r for r in toy[1] if r["split"] == "val"), key=lambda r: (r["image_id"], r["ref_id"]))
    assert [i for ids in out for i in ids] == [s["sent_id"] for r in val for s in r["sentences"]]


def test_batches_pin_every_tensor_of_a_sample(toy, monkeypatch) -> None:
    """What the DataLoader's pinning thread does with a batch (`pin_memory=True` on CUDA machines):
    `ImageSample.pin_memory` reaches every tensor, prepared proposals included."""
    import torch
    from torch.utils.data._utils.pin_memory import pin_memory

    from copatch.proposals import Proposals

    root, _, _ = toy
    sample = ReferDataset(root, split="val")[0]
    sample.prepared["proposals:x"] = Proposals(sample.instance_masks.clone())
    sample.prepared["gem:1"] = torch.zeros(3, 4, 4)
    pinned_ids = []

    def fake_pin(self, *args, **kwargs):  # no CUDA here: record instead of pinning
        copy = self.clone()
        pinned_ids.append(id(copy))
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    (out,) = pin_memory([sample])
    tensors = [out.image, out.targets, out.instance_masks, out.prepared["proposals:x"].masks, out.prepared["gem:1"]]
    assert sorted(id(t) for t in tensors) == sorted(pinned_ids)
    assert torch.equal(out.targets, sample.targets) and out.expressions == sample.expressions
    assert isinstance(out.prepared["proposals:x"], Proposals)

