"""The PhraseCut reader on a fixture in the exact official format, checked against hand-computed areas
and independent (numpy) rasterisations."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from copatch.datamodules.phrasecut import PhraseCutDataModule, PhraseCutDataset, polygons_mask
from copatch.types import ImageSample

CONFIGS = Path(__file__).parents[2] / "configs"
DATA = Path("data/VGPhraseCut_v0")

# image_id -> (H, W, split). Portrait and landscape sizes catch a swapped (w, h); 99 is in no refer file.
IMAGES: dict[int, tuple[int, int, str]] = {
    11: (48, 64, "val"),
    7: (56, 40, "val"),
    23: (30, 50, "test"),
    31: (32, 32, "miniv"),
    99: (20, 20, "train"),
}
GRAYSCALE_IMAGE = 31


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


# Instances: a list of polygons, each a list of [x, y] (the official `Polygons[instance]`).
WINDOWS = [_rect(2, 3, 10, 7), _rect(20.9, 2.2, 25.7, 6.99)]  # one instance, two polygons; floats truncate
BOX_A = [_rect(30, 10, 45, 20)]
BOX_B = [_rect(40, 15, 50, 30), [[60, 44]]]  # overlaps BOX_A; plus a degenerate 1-point polygon
DOOR = [_rect(0, 40, 5, 47)]
SPECK = [[[33, 3]]]  # an instance made only of a degenerate polygon: draws nothing
TRIANGLE = [[[3, 4], [13, 4], [3, 14]]]
WIRE = [[[2, 30], [12, 30]]]  # 2 points: PIL (and the official code) draw a line
SIGN = [_rect(5, 5, 14, 9)]
SIGN_AGAIN = [_rect(5.4, 5.9, 14.8, 9.2)]  # int-casts to SIGN: the same instance
WALL = [_rect(0, 0, 31, 31)]


def _task(task_id: str, image_id: int, phrase: str, instances: list[list]) -> dict:
    boxes = []
    for instance in instances:
        pts = np.array([p for poly in instance for p in poly], dtype=float)
        boxes.append([float(pts[:, 0].min()), float(pts[:, 1].min()), float(np.ptp(pts[:, 0]) + 1),
                      float(np.ptp(pts[:, 1]) + 1)])
    name = phrase.split()[-1]
    return {
        "task_id": task_id,
        "image_id": image_id,
        "ann_ids": [int(a) for a in task_id.split("__")[1].split("_")],
        "instance_boxes": boxes,
        "Polygons": instances,
        "phrase": phrase,
        "phrase_structure": {"name": name, "attributes": [], "relation_ids": [], "relation_descriptions": [],
                             "type": "name"},
    }


# File order deliberately interleaves images; the reader sorts images and keeps each image's file order.
TASKS: dict[str, list[dict]] = {
    "val": [
        _task("11__101", 11, "two windows", [WINDOWS]),
        _task("7__201", 7, "the triangle", [TRIANGLE]),
        _task("11__102_103", 11, "overlapping boxes", [BOX_A, BOX_B]),
        _task("7__202", 7, "a wire", [WIRE]),
        _task("11__101_104_105", 11, "windows and door", [WINDOWS, DOOR, SPECK]),
    ],
    "test": [
        _task("23__301", 23, "the sign", [SIGN]),
        _task("23__302", 23, "white sign", [SIGN_AGAIN]),
    ],
    "miniv": [_task("31__401", 31, "the wall", [WALL])],
}


def write_phrasecut_fixture(root: str | Path, tasks: dict[str, list[dict]] | None = None,
                            images: dict[int, tuple[int, int, str]] | None = None) -> Path:
    """Write PhraseCut's official layout under `root`: `data/VGPhraseCut_v0/refer_<split>.json` per
    split of `tasks`, `image_data_split.json` for `images`, and `images/<image_id>.jpg`. Returns `root`."""
    root, tasks, images = Path(root), tasks or TASKS, images or IMAGES
    data = root / DATA
    (data / "images").mkdir(parents=True, exist_ok=True)
    for split, split_tasks in tasks.items():
        (data / f"refer_{split}.json").write_text(json.dumps(split_tasks))
    info = [{"image_id": i, "coco_id": None, "flickr_id": None, "width": w, "height": h,
             "url": f"https://cs.stanford.edu/people/rak248/VG_100K/{i}.jpg", "split": split}
            for i, (h, w, split) in images.items()]
    (data / "image_data_split.json").write_text(json.dumps(info))
    rng = np.random.default_rng(0)
    for i, (h, w, _) in images.items():
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        picture = Image.fromarray(pixels)
        (picture.convert("L") if i == GRAYSCALE_IMAGE else picture).save(data / "images" / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def pc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phrasecut_fixture(tmp_path_factory.mktemp("phrasecut"))


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A copy for tests that damage it."""
    return write_phrasecut_fixture(tmp_path / "pc")


# ---- independent rasters (numpy, no PIL) ------------------------------------------------------------


def _np_rect(h: int, w: int, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """PIL's polygon with outline=1 covers the boundary: (x1-x0+1)*(y1-y0+1) pixels after int()."""
    m = np.zeros((h, w), bool)
    m[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1] = True
    return m


def _np_triangle(h: int, w: int, x0: int, y0: int, n: int) -> np.ndarray:
    """Right isosceles triangle (x0,y0),(x0+n,y0),(x0,y0+n), boundary included."""
    yy, xx = np.mgrid[:h, :w]
    return (xx >= x0) & (yy >= y0) & ((xx - x0) + (yy - y0) <= n)


def _expected_instances() -> dict[str, np.ndarray]:
    h11, w11, _ = IMAGES[11]
    h7, w7, _ = IMAGES[7]
    h23, w23, _ = IMAGES[23]
    wire = np.zeros((h7, w7), bool)
    wire[30, 2:13] = True
    return {
        "windows": _np_rect(h11, w11, 2, 3, 10, 7) | _np_rect(h11, w11, 20, 2, 25, 6),
        "box_a": _np_rect(h11, w11, 30, 10, 45, 20),
        "box_b": _np_rect(h11, w11, 40, 15, 50, 30),
        "door": _np_rect(h11, w11, 0, 40, 5, 47),
        "triangle": _np_triangle(h7, w7, 3, 4, 10),
        "wire": wire,
        "sign": _np_rect(h23, w23, 5, 5, 14, 9),
        "wall": np.ones((32, 32), bool),
    }


# ---- reading ------------------------------------------------------------------------------------------


def test_counts_ids_and_order(pc: Path) -> None:
    ds = PhraseCutDataset(pc, split="val")
    assert [e.image_id for e in ds.entries] == [7, 11] and len(ds) == 2 and ds.num_expressions == 5
    samples = [ds[0], ds[1]]
    assert [[e.id for e in s.expressions] for s in samples] == [
        ["7__201", "7__202"], ["11__101", "11__102_103", "11__101_104_105"]]
    assert all(isinstance(e.id, str) and e.ref_id is None for s in samples for e in s.expressions)
    assert [e.text for e in samples[1].expressions] == ["two windows", "overlapping boxes", "windows and door"]
    assert samples[1].file_name == str(pc / DATA / "images" / "11.jpg")
    again = PhraseCutDataset(pc, split="val")
    assert [[e.id for e in x.expressions] for x in again.entries] == [[e.id for e in x.expressions] for x in ds.entries]

    test = PhraseCutDataset(pc)  # default split: test
    assert test.split == "test" and [e.image_id for e in test.entries] == [23] and test.num_expressions == 2
    both = PhraseCutDataset(pc, split="val_miniv")
    assert [e.image_id for e in both.entries] == [7, 11, 31] and both.num_expressions == 6
    assert len(PhraseCutDataset(pc, split="miniv")) == 1
    assert [e.image_id for e in PhraseCutDataset(pc, split="val_miniv", limit=2).entries] == [7, 11]


def test_image_and_shapes(pc: Path) -> None:
    ds = PhraseCutDataset(pc, split="val_miniv")
    for i, image_id in enumerate((7, 11, 31)):
        s = ds[i]
        h, w, _ = IMAGES[image_id]
        assert isinstance(s, ImageSample) and s.image_id == image_id and s.size == (h, w)
        assert s.image.shape == (3, h, w) and s.image.dtype == torch.uint8
        assert s.targets.shape == (len(s.expressions), h, w) and s.targets.dtype == torch.bool
        assert s.instance_masks.dtype == torch.bool and s.instance_masks.shape[1:] == (h, w)
    gray = ds[2].image  # saved as an L-mode JPEG
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_mask_areas_and_union(pc: Path) -> None:
    exp = _expected_instances()
    # Hand-computed areas: (x1-x0+1)*(y1-y0+1) per int-cast rectangle.
    assert exp["windows"].sum() == 9 * 5 + 6 * 5 == 75
    assert exp["box_a"].sum() == exp["box_b"].sum() == 176 and (exp["box_a"] & exp["box_b"]).sum() == 6 * 6
    assert exp["door"].sum() == 48 and exp["triangle"].sum() == 11 * 12 // 2 and exp["wire"].sum() == 11

    val = PhraseCutDataset(pc, split="val")
    s7, s11 = val[0], val[1]
    t7, t11 = s7.targets.numpy(), s11.targets.numpy()
    np.testing.assert_array_equal(t7[0], exp["triangle"])
    np.testing.assert_array_equal(t7[1], exp["wire"])  # a 2-point polygon is drawn, as a line
    np.testing.assert_array_equal(t11[0], exp["windows"])  # both polygons of one instance
    np.testing.assert_array_equal(t11[1], exp["box_a"] | exp["box_b"])  # overlapping instances: union
    assert t11[1].sum() == 176 + 176 - 36
    assert not t11[1][44, 60]  # the 1-point polygon of BOX_B is skipped, as the official code skips it
    np.testing.assert_array_equal(t11[2], exp["windows"] | exp["door"])  # SPECK adds nothing
    assert t11[2].sum() == 75 + 48

    test = PhraseCutDataset(pc, split="test")[0]
    np.testing.assert_array_equal(test.targets[0].numpy(), exp["sign"])
    np.testing.assert_array_equal(test.targets[1].numpy(), exp["sign"])  # float corners truncate to SIGN
    assert PhraseCutDataset(pc, split="miniv")[0].targets.sum() == 32 * 32


def test_instance_masks_are_the_distinct_instances(pc: Path) -> None:
    exp = _expected_instances()
    val = PhraseCutDataset(pc, split="val")
    s7, s11 = val[0], val[1]
    # Image 11: WINDOWS appears in two tasks (kept once), SPECK draws nothing (left out).
    np.testing.assert_array_equal(s11.instance_masks.numpy(),
                                  np.stack([exp["windows"], exp["box_a"], exp["box_b"], exp["door"]]))
    np.testing.assert_array_equal(s7.instance_masks.numpy(), np.stack([exp["triangle"], exp["wire"]]))
    test = PhraseCutDataset(pc, split="test")[0]
    assert test.instance_masks.shape[0] == 1  # SIGN and SIGN_AGAIN rasterise from the same int points
    for s in (s7, s11, test):  # every target is a union of instances
        for target in s.targets:
            parts = [m for m in s.instance_masks if (m & ~target).sum() == 0]
            assert torch.equal(torch.stack(parts).any(0), target)


def test_polygons_mask_matches_a_per_polygon_pil_rasterisation() -> None:
    """The official recipe written out separately: one PIL canvas per polygon, summed, > 0."""
    h, w = 40, 50
    polygons = [
        [[3.7, 2.2], [30.9, 5.5], [18.1, 25.8], [25.0, 12.0], [2.0, 20.6]],  # concave, float
        [[20, 20], [45.9, 22.4], [44, 39.99], [28, 35]],  # overlaps the first
        [[1, 38], [9, 38]],  # a line
        [[7, 7]],  # skipped
        [],  # skipped
    ]
    total = np.zeros((h, w))
    for poly in polygons:
        if len(poly) < 2:
            continue
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).polygon([(int(x), int(y)) for x, y in poly], outline=1, fill=1)
        total += np.array(canvas)
    expected = total > 0
    np.testing.assert_array_equal(polygons_mask(polygons, h, w), expected)
    assert 0 < expected.sum() < h * w
    assert not polygons_mask([[[7, 7]], []], h, w).any()


def test_published_count_warning(pc: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="copatch"):
        PhraseCutDataset(pc, split="val")
    messages = [r.getMessage() for r in caplog.records if r.name == "copatch"]
    assert any("20316" in m and "2971" in m and " 5 phrases on 2 images" in m for m in messages)


# ---- errors ---------------------------------------------------------------------------------------


def test_missing_files(fresh: Path, tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        PhraseCutDataset(nowhere)
    message = str(err.value)
    assert str(nowhere / DATA / "refer_test.json") in message
    assert "ChenyunWu/PhraseCutDataset" in message and "download_dataset.py" in message
    (fresh / DATA / "refer_miniv.json").unlink()
    assert len(PhraseCutDataset(fresh, split="val")) == 2
    with pytest.raises(FileNotFoundError, match=re.escape(str(fresh / DATA / "refer_miniv.json"))):
        PhraseCutDataset(fresh, split="val_miniv")
    with pytest.raises(FileNotFoundError, match="refer_miniv.json"):
        PhraseCutDataModule(str(fresh), split="miniv").prepare_data()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "no-images"))):
        PhraseCutDataset(fresh, split="val", image_root=tmp_path / "no-images")
    (fresh / DATA / "image_data_split.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(fresh / DATA / "image_data_split.json"))):
        PhraseCutDataset(fresh, split="val")


def test_image_root(fresh: Path, tmp_path: Path) -> None:
    moved = tmp_path / "vg"
    (fresh / DATA / "images").rename(moved)
    ds = PhraseCutDataset(fresh, split="val", image_root=moved)
    assert ds[0].file_name == str(moved / "7.jpg") and ds[0].image.shape == (3, 56, 40)


def test_unknown_split_lists_valid_ones(pc: Path) -> None:
    with pytest.raises(ValueError, match="train, val, test, miniv, val_miniv"):
        PhraseCutDataset(pc, split="testA")
    with pytest.raises(ValueError, match="train, val, test, miniv, val_miniv"):
        PhraseCutDataModule(str(pc), split="validation")  # at config time


def _rewrite(root: Path, split: str, edit) -> None:
    path = root / DATA / f"refer_{split}.json"
    tasks = json.loads(path.read_text())
    edit(tasks)
    path.write_text(json.dumps(tasks))


def test_bad_tasks_fail_at_construction(fresh: Path) -> None:
    _rewrite(fresh, "val", lambda t: t[3].update(phrase=None))
    with pytest.raises(ValueError, match="phrase of task_id=7__202 .* is not a string") as err:
        PhraseCutDataset(fresh, split="val")
    assert "refer_val.json" in str(err.value)
    # An empty phrase is kept: the module records it as a failure (tests/test_inputs.py).
    _rewrite(fresh, "val", lambda t: t[3].update(phrase="  "))
    assert [e.text for s in PhraseCutDataset(fresh, split="val") for e in s.expressions if e.id == "7__202"] == ["  "]
    _rewrite(fresh, "val", lambda t: t[3].update(phrase="a wire", task_id="11__101"))
    with pytest.raises(ValueError, match="Duplicate task_id=11__101"):
        PhraseCutDataset(fresh, split="val")
    _rewrite(fresh, "val", lambda t: (t[3].update(task_id="7__202"), t[0].pop("Polygons")))
    with pytest.raises(ValueError, match="11__101.*Polygons.*refer_input"):
        PhraseCutDataset(fresh, split="val")
    _rewrite(fresh, "val", lambda t: t[0].update(Polygons=[WINDOWS], image_id=23))
    with pytest.raises(ValueError, match="image_id=23.*'test'.*image_data_split.json"):
        PhraseCutDataset(fresh, split="val")
    _rewrite(fresh, "val", lambda t: t[0].update(image_id=12345))
    with pytest.raises(ValueError, match="image_id=12345, which is not listed"):
        PhraseCutDataset(fresh, split="val")
    _rewrite(fresh, "val", lambda t: t[0].update(image_id=11, Polygons=[[[[1, 2, 3], [4, 5, 6]]]]))
    with pytest.raises(ValueError, match="Bad Polygons of task_id=11__101"):
        PhraseCutDataset(fresh, split="val")


def test_image_size_mismatch(fresh: Path) -> None:
    path = fresh / DATA / "images" / "11.jpg"
    with Image.open(path) as im:
        im.resize((48, 64)).save(path)  # (w, h) swapped
    ds = PhraseCutDataset(fresh, split="val")  # construction only indexes
    assert ds[0].image_id == 7
    with pytest.raises(ValueError, match="64x48 \\(HxW\\)") as err:
        ds[1]
    assert str(path) in str(err.value) and "image_data_split.json says 48x64" in str(err.value)


def test_corrupt_and_missing_image(fresh: Path) -> None:
    path = fresh / DATA / "images" / "7.jpg"
    path.write_bytes(b"not a jpeg" * 20)
    ds = PhraseCutDataset(fresh, split="val")
    with pytest.raises(OSError, match=re.escape(str(path))):
        ds[0]
    path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        ds[0]


# ---- DataModule -----------------------------------------------------------------------------------


def test_datamodule_predict_dataloader(pc: Path) -> None:
    dm = PhraseCutDataModule(str(pc), split="val_miniv", batch_size=2, num_workers=2)
    assert dm.hparams["batch_size"] == 2 and dm.hparams["split"] == "val_miniv"
    assert PhraseCutDataModule(str(pc)).hparams["split"] == "test"
    dm.prepare_data()
    batches = list(dm.predict_dataloader())  # (the base's behaviour: tests/datamodules/test_base.py)
    assert [len(b) for b in batches] == [2, 1]
    assert all(isinstance(s, ImageSample) for b in batches for s in b)
    assert [s.image_id for b in batches for s in b] == [7, 11, 31]
    limited = PhraseCutDataModule(str(pc), split="val_miniv", batch_size=3, limit=1)
    assert [[s.image_id for s in b] for b in limited.predict_dataloader()] == [[7]]


def test_trainer_predict(pc: Path) -> None:
    """The batches survive Lightning's device transfer as lists of `ImageSample`."""
    import lightning as L

    class Echo(L.LightningModule):
        def predict_step(self, batch: list[ImageSample], batch_idx: int) -> list[str]:
            assert all(isinstance(s, ImageSample) and s.targets.shape[0] == len(s.expressions) for s in batch)
            return [e.id for s in batch for e in s.expressions]

    dm = PhraseCutDataModule(str(pc), split="val_miniv", batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    out = trainer.predict(Echo(), datamodule=dm)
    assert [i for ids in out for i in ids] == ["7__201", "7__202", "11__101", "11__102_103", "11__101_104_105",
                                               "31__401"]


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_config_composes(capsys: pytest.CaptureFixture) -> None:
    import yaml

    from copatch.cli import build_cli

    with pytest.raises(SystemExit):
        build_cli(["predict", "--config", str(CONFIGS / "toy.yaml"),
                   "--config", str(CONFIGS / "data" / "phrasecut.yaml"), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["class_path"] == "copatch.datamodules.phrasecut.PhraseCutDataModule"
    assert config["data"]["init_args"] == {"root": "data/phrasecut", "split": "test", "image_root": None,
                                           "batch_size": 4, "num_workers": 4, "limit": None,
                                           "group_by_size": False}
    assert config["model"]["proposer"] == {"class_path": "copatch.proposals.StoredProposals",
                                           "init_args": {"root": "data/proposals/phrasecut",
                                                         "decode_in_workers": True}}
