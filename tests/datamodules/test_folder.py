"""FolderDataModule: a written folder of demo scenes (JSONL and CSV, with and without masks, a missing
image, malformed lines) through `copatch predict`, with the metrics recomputed in NumPy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from copatch.cli import build_cli
from copatch.datamodules.folder import FolderDataModule, FolderDataset
from copatch.demo.dataset import demo_image
from copatch.errors import UserFileNotFound, UserValueError

CONFIGS = Path(__file__).parents[2] / "configs"


def _write_folder(root: Path, indices: list[int], with_masks: list[bool], missing: int | None = None) -> list[dict]:
    """Demo scenes as `scene<i>.png` (+ `masks/<i>-<k>.png`, 0/255); returns the rows, in file order."""
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for index, masked in zip(indices, with_masks):
        _, image, masks, chosen, _ = demo_image(seed=1, index=index)
        if index != missing:
            Image.fromarray(image).save(root / f"scene{index}.png")
        for k, c in enumerate(chosen[:3]):
            row = {"image": f"scene{index}.png", "expression": c.text}
            if k == 0:
                row["id"] = f"given-{index}"
            if masked:
                Image.fromarray(masks[c.target].astype(np.uint8) * 255).save(root / "masks" / f"{index}-{k}.png")
                row["mask"] = f"masks/{index}-{k}.png"
            rows.append(row)
    return rows


def _predict(root: Path, out: Path) -> tuple[dict, list[dict]]:
    build_cli(["predict", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "data/folder.yaml"),
               "--config", str(CONFIGS / "proposers/demo_regions.yaml"), "--data.init_args.root", str(root),
               "--data.init_args.num_workers", "0", "--trainer.default_root_dir", str(out),
               "--trainer.callbacks", "copatch.callbacks.prediction_writer.PredictionWriter"])
    lines = [json.loads(line) for line in (out / "predictions.rank0.jsonl").read_text().splitlines()]
    return json.loads((out / "metrics.json").read_text()), lines


def _numpy_metrics(root: Path, rows: list[dict], lines: list[dict], ids: list) -> dict:
    """oIoU, mIoU, Pr@0.5 from the written prediction masks and the given mask files."""
    by_id = {str(line["id"]): line for line in lines}
    inters, unions = [], []
    for row, expr_id in zip(rows, ids):
        if "mask" not in row:
            continue
        truth = np.asarray(Image.open(root / row["mask"])) > 0
        rle = by_id[str(expr_id)]["mask"]
        pred = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
        inters.append(int((pred & truth).sum()))
        unions.append(int((pred | truth).sum()))
    inter, union = np.array(inters), np.array(unions)
    iou = inter / np.maximum(union, 1)
    return {"oIoU": 100 * inter.sum() / union.sum(), "mIoU": 100 * iou.mean(), "Pr@0.5": 100 * (iou > 0.5).mean(),
            "n": len(iou)}


def _ids(rows: list[dict], first_line: int) -> list:
    return [r.get("id", f"{Path(r['image']).stem}:{first_line + k}") for k, r in enumerate(rows)]


def test_jsonl_with_masks_and_a_missing_image(tmp_path):
    root = tmp_path / "images"
    rows = _write_folder(root, [0, 3, 5], [True, True, True], missing=3)
    (root / "expressions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics, lines = _predict(root, tmp_path / "run")
    ids = _ids(rows, 1)
    assert sorted(map(str, (line["id"] for line in lines))) == sorted(map(str, ids))  # every line predicted
    failed = [line for line in lines if line.get("failure")]
    assert failed and all(line["image_id"] == "scene3" and line["failure"]["kind"] == "image" for line in failed)
    assert all(line["iou"] == 0 for line in failed)  # counted, as IoU 0
    expected = _numpy_metrics(root, rows, lines, ids)
    got = metrics["metrics"]
    assert got["n"] == expected["n"] == len(rows)
    for key in ("oIoU", "mIoU", "Pr@0.5"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6)
    assert expected["mIoU"] > 0  # the demo scenes do get right masks


def test_csv_with_and_without_masks(tmp_path):
    root = tmp_path / "images"
    rows = _write_folder(root, [1, 2], [False, True])
    with open(root / "expressions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "expression", "id", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    metrics, lines = _predict(root, tmp_path / "run")
    ids = _ids(rows, 2)  # line 1 is the header
    assert sorted(str(line["id"]) for line in lines) == sorted(map(str, ids))
    unmasked = [line for line in lines if line["image_id"] == "scene1"]
    assert unmasked and all(line["iou"] is None and line["inter"] is None for line in unmasked)
    expected = _numpy_metrics(root, rows, lines, ids)  # over the lines with masks only
    assert metrics["metrics"]["n"] == expected["n"] == sum("mask" in r for r in rows)
    for key in ("oIoU", "mIoU"):
        assert metrics["metrics"][key] == pytest.approx(expected[key], abs=1e-6)


def _dataset(tmp_path: Path, text: str, name: str = "expressions.jsonl") -> FolderDataset:
    (tmp_path / name).write_text(text)
    return FolderDataset(tmp_path)


@pytest.mark.parametrize("text, where, what", [
    ('{"image": "a.png", "expression": "x"}\n\n{"image": "a.png", "expression": "y"\n', 3, "not a JSON object"),
    ('{"image": "a.png"}\n', 1, "no 'expression'"),
    ('{"image": "a.png", "expression": "  "}\n', 1, "empty"),
    ('["a.png", "x"]\n', 1, "JSON object"),
    ('{"image": "a.png", "expression": 3}\n', 1, "must be a string"),
    ('{"image": "a.png", "expression": "x", "id": 7}\n{"image": "b.png", "expression": "y", "id": 7}\n', 2,
     "already used on line 1"),
    ('{"image": "a.png", "expression": "x", "mask": "m.png"}\n{"image": "a.png", "expression": "y"}\n', 2,
     "all give a mask or none"),
    ('{"image": "a.png", "expression": "x"}\n{"image": "a.jpg", "expression": "y"}\n', 2, "rename one"),
])
def test_a_malformed_line_names_file_and_line(tmp_path, text, where, what):
    Image.new("L", (4, 4)).save(tmp_path / "m.png")
    with pytest.raises(UserValueError, match=what) as err:
        _dataset(tmp_path, text)
    assert f"expressions.jsonl:{where}:" in str(err.value)


def test_csv_problems_name_the_line(tmp_path):
    with pytest.raises(UserValueError, match=r"expressions.csv:1: .*without expression"):
        _dataset(tmp_path, "image,text\na.png,x\n", "expressions.csv")
    with pytest.raises(UserValueError, match=r"expressions.csv:4: no 'expression'"):  # after a blank line 3
        _dataset(tmp_path, "image,expression\na.png,x\n\nb.png,\n", "expressions.csv")
    with pytest.raises(UserValueError, match=r"expressions.csv:2: more cells"):
        _dataset(tmp_path, "image,expression\na.png,x,y\n", "expressions.csv")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(UserFileNotFound, match="no expressions file"):
        FolderDataset(tmp_path)
    with pytest.raises(UserFileNotFound, match=r"expressions.jsonl:1: mask file .*nope.png"):
        _dataset(tmp_path, '{"image": "a.png", "expression": "x", "mask": "nope.png"}\n')


def test_ids_targets_and_mask_size(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (6, 4), (9, 9, 9)).save(tmp_path / "sub" / "b.png")
    Image.fromarray(np.eye(4, 6, dtype=np.uint8) * 255).save(tmp_path / "m.png")
    Image.new("L", (5, 5)).save(tmp_path / "small.png")
    ds = _dataset(tmp_path, '{"image": "sub/b.png", "expression": "x", "mask": "m.png"}\n'
                            '{"image": "sub/b.png", "expression": "y", "id": "mine", "mask": "m.png"}\n'
                            '{"image": "sub/b.png", "expression": "z", "mask": "small.png"}\n')
    assert [e.image_id for e in ds.entries] == ["sub__b"]
    with pytest.raises(UserValueError, match=r"expressions.jsonl:3: mask .*small.png is 5x5 .* 4x6"):
        ds[0]
    ds.entries[0].lines.pop()
    sample = ds[0]
    assert [e.id for e in sample.expressions] == ["sub__b:1", "mine"]
    assert sample.targets.shape == (2, 4, 6) and np.array_equal(sample.targets[0].numpy(), np.eye(4, 6, dtype=bool))
    assert sample.error is None and sample.image.shape == (3, 4, 6)


def test_datamodule_batches_samples(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "expressions.jsonl").write_text('{"image": "a.png", "expression": "x"}\n'
                                                '{"image": "gone.png", "expression": "y"}\n')
    dm = FolderDataModule(str(tmp_path), batch_size=2)
    dm.prepare_data()
    batch = next(iter(dm.predict_dataloader()))
    assert [s.image_id for s in batch] == ["a", "gone"]
    assert batch[0].error is None and "Image not found" in batch[1].error and batch[1].targets is None
