"""Demo data files: PNG images under `.png` names, the upgrade of data written with `.jpg` names, and
failure messages that name the demo fix (regenerate the folder), never a COCO download."""

from __future__ import annotations

import json
import os
import pickle

import pytest
from PIL import Image

from copatch.demo.datamodule import DemoReferDataModule
from copatch.demo.dataset import IMAGE_DIR, check_demo_files, upgrade_demo_images, write_demo_refer
from copatch.errors import UserFileNotFound

NUM_IMAGES = 3


@pytest.fixture
def demo_root(tmp_path):
    return write_demo_refer(tmp_path / "demo-data", num_images=NUM_IMAGES, seed=4)


def _image_names(root) -> list[str]:
    return [im["file_name"] for im in json.loads((root / "demo" / "instances.json").read_text())["images"]]


def test_images_are_png_with_png_names(demo_root):
    names = _image_names(demo_root)
    assert len(names) == NUM_IMAGES and all(n.endswith(".png") for n in names)
    assert sorted(os.listdir(demo_root / IMAGE_DIR)) == sorted(names)
    for name in names:
        with Image.open(demo_root / IMAGE_DIR / name) as im:
            assert im.format == "PNG"
    with open(demo_root / "demo" / "refs(unc).p", "rb") as f:
        assert all(r["file_name"].endswith(".png") for r in pickle.load(f))


def _make_old_layout(root) -> None:
    """Demo data as written before: PNG content under `COCO_train2014_%012d.jpg` names."""
    instances_file = root / "demo" / "instances.json"
    instances = json.loads(instances_file.read_text())
    for im in instances["images"]:
        old = f"COCO_train2014_{im['id']:012d}.jpg"
        os.replace(root / IMAGE_DIR / im["file_name"], root / IMAGE_DIR / old)
        im["file_name"] = old
    instances_file.write_text(json.dumps(instances))


def test_old_demo_data_is_renamed_in_place_and_reads_the_same(demo_root, tmp_path):
    before = DemoReferDataModule(str(demo_root), num_images=NUM_IMAGES)
    before.prepare_data()
    before.setup("predict")
    expected = [before.dataset[i] for i in range(len(before.dataset))]

    _make_old_layout(demo_root)
    module = DemoReferDataModule(str(demo_root), num_images=NUM_IMAGES)
    module.prepare_data()  # renames, does not rewrite the data
    assert all(n.endswith(".png") for n in _image_names(demo_root))
    assert not [n for n in os.listdir(demo_root / IMAGE_DIR) if n.endswith(".jpg")]
    assert upgrade_demo_images(demo_root) == 0  # idempotent
    module.setup("predict")
    for want, got in zip(expected, (module.dataset[i] for i in range(len(module.dataset)))):
        assert got.error is None and got.image_id == want.image_id
        assert got.image.equal(want.image) and got.targets.equal(want.targets)


def test_an_interrupted_upgrade_finishes_on_the_next_run(demo_root):
    _make_old_layout(demo_root)
    names = _image_names(demo_root)
    first = demo_root / IMAGE_DIR / names[0]
    os.replace(first, demo_root / IMAGE_DIR / f"demo_{1:012d}.png")  # one file renamed, index not yet
    assert upgrade_demo_images(demo_root) == NUM_IMAGES
    check_demo_files(demo_root)


@pytest.mark.parametrize("missing", ["image", "proposals", "instances"])
def test_incomplete_demo_data_names_the_file_and_the_demo_fix(demo_root, missing):
    name = _image_names(demo_root)[1]
    path = {"image": demo_root / IMAGE_DIR / name, "proposals": demo_root / "proposals" / "2.json",
            "instances": demo_root / "demo" / "instances.json"}[missing]
    path.unlink()
    module = DemoReferDataModule(str(demo_root), num_images=NUM_IMAGES)
    with pytest.raises(UserFileNotFound) as info:
        module.prepare_data()
    message = str(info.value)
    assert str(path) in message and f"delete {demo_root}" in message
    assert "COCO" not in message and "train2014.zip" not in message and "refer project" not in message


def test_a_bad_demo_image_is_recorded_with_the_demo_fix(demo_root):
    module = DemoReferDataModule(str(demo_root), num_images=NUM_IMAGES)
    module.prepare_data()
    module.setup("predict")
    path = demo_root / IMAGE_DIR / _image_names(demo_root)[0]
    path.write_bytes(b"not an image")
    sample = module.dataset[0]
    assert sample.error is not None and str(path) in sample.error and "unreadable" in sample.error
    assert f"delete {demo_root}" in sample.error and "COCO" not in sample.error
    path.unlink()
    sample = module.dataset[0]
    assert "is missing" in sample.error and "COCO" not in sample.error


def test_the_refer_reader_on_demo_data_names_the_demo_fix(demo_root):
    from copatch.datamodules.refer import ReferDataset

    (demo_root / "demo" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match="copatch's demo data") as info:
        ReferDataset(demo_root, dataset="demo", split_by="unc", split="val")
    assert f"delete {demo_root}" in str(info.value) and "refer project" not in str(info.value)
