"""Tests of `copatch.proposals`: the stored-proposal format, its errors, and the GT oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from copatch.proposals import GroundTruthProposals, MaskProposer, Proposals, StoredProposals
from copatch.types import Expression, ImageSample


def _sample(
    h: int, w: int, image_id: int | str = 7, instances: torch.Tensor | None = None
) -> ImageSample:
    return ImageSample(
        image_id=image_id,
        image=torch.zeros(3, h, w, dtype=torch.uint8),
        expressions=[Expression(id=1, text="the dog")],
        instance_masks=instances,
        file_name=f"img_{image_id}.jpg",
    )


def _proposals(n: int, h: int, w: int, scores: bool = True) -> Proposals:
    gen = torch.Generator().manual_seed(n * 1000 + h)
    masks = torch.rand(n, h, w, generator=gen) < 0.4
    if n >= 2:
        masks[1] = False  # an empty mask is kept
    if n >= 3:
        masks[2] = masks[0]  # and so is a duplicate
    return Proposals(masks=masks, scores=torch.rand(n, generator=gen) if scores else None)


@pytest.mark.parametrize("scores", [True, False])
def test_write_read_round_trip(tmp_path: Path, scores: bool) -> None:
    store = StoredProposals(tmp_path / "props")
    props = _proposals(5, 13, 21, scores=scores)
    path = store.write(7, props)
    assert path == tmp_path / "props" / "7.json" and store.exists(7)
    assert [p.name for p in path.parent.iterdir()] == ["7.json"]  # no temporary file left behind
    loaded = store(_sample(13, 21))
    assert isinstance(store, MaskProposer)
    assert torch.equal(loaded.masks, props.masks)
    if scores:
        assert loaded.scores is not None and loaded.scores.dtype == torch.float32
        assert torch.equal(loaded.scores, props.scores)
    else:
        assert loaded.scores is None
    record = json.loads(path.read_text())
    assert record["image_id"] == 7 and (record["height"], record["width"]) == (13, 21)
    assert all(isinstance(m["counts"], str) for m in record["masks"])


def test_zero_proposals(tmp_path: Path) -> None:
    store = StoredProposals(tmp_path)
    empty = Proposals(masks=torch.zeros(0, 4, 6, dtype=torch.bool), scores=torch.zeros(0))
    store.write("abc", empty)
    loaded = store(_sample(4, 6, image_id="abc"))
    assert loaded.masks.shape == (0, 4, 6) and len(loaded) == 0
    assert loaded.scores is not None and loaded.scores.shape == (0,)


def test_overwrite_is_atomic_replace(tmp_path: Path) -> None:
    store = StoredProposals(tmp_path)
    store.write(1, _proposals(3, 5, 5))
    new = _proposals(2, 5, 5)
    store.write(1, new)
    assert torch.equal(store.load(1).masks, new.masks)


def test_missing_file_names_path_and_how_to_produce(tmp_path: Path) -> None:
    store = StoredProposals(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        store(_sample(4, 4, image_id=42))
    msg = str(err.value)
    assert str(tmp_path / "42.json") in msg and "cache_dir" in msg and "format" in msg


_HEAD = {"image_id": 3, "height": 4, "width": 4}


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"image_id": 3, "height": 4}),
        json.dumps({**_HEAD, "masks": [{"size": [4, 4], "counts": ""}]}),  # empty RLE
        json.dumps({**_HEAD, "masks": [{"size": [4, 5], "counts": "0b0"}]}),  # RLE size differs
        json.dumps({**_HEAD, "masks": "nope"}),
        json.dumps({**_HEAD, "masks": [], "scores": [0.5]}),  # one score too many
    ],
)
def test_corrupt_file_names_the_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "3.json").write_text(content)
    with pytest.raises(ValueError) as err:
        StoredProposals(tmp_path)(_sample(4, 4, image_id=3))
    assert str(tmp_path / "3.json") in str(err.value)


def test_truncated_file_is_corrupt(tmp_path: Path) -> None:
    store = StoredProposals(tmp_path)
    path = store.write(3, _proposals(4, 30, 30))
    path.write_text(path.read_text()[:-40])
    with pytest.raises(ValueError, match="corrupt"):
        store(_sample(30, 30, image_id=3))


def test_wrong_size_names_file_both_sizes_and_fix(tmp_path: Path) -> None:
    store = StoredProposals(tmp_path)
    store.write(9, _proposals(2, 10, 12))
    with pytest.raises(ValueError) as err:
        store(_sample(20, 24, image_id=9))
    msg = str(err.value)
    assert str(tmp_path / "9.json") in msg
    assert "10x12" in msg and "20x24" in msg and "original image resolution" in msg


def test_image_id_mismatch(tmp_path: Path) -> None:
    store = StoredProposals(tmp_path)
    path = store.write(1, _proposals(1, 3, 3))
    path.rename(tmp_path / "2.json")
    with pytest.raises(ValueError, match="2.json"):
        store(_sample(3, 3, image_id=2))


def test_bad_image_id_and_bad_proposals() -> None:
    with pytest.raises(ValueError):
        StoredProposals("x").path("a/b")
    with pytest.raises(ValueError):
        Proposals(masks=torch.zeros(2, 3, 3))  # not bool
    with pytest.raises(ValueError):
        Proposals(masks=torch.zeros(2, 3, 3, dtype=torch.bool), scores=torch.zeros(3))


def test_ground_truth_proposals() -> None:
    inst = torch.zeros(3, 5, 6, dtype=torch.bool)
    inst[0, :2] = True
    inst[2, 3:, 4:] = True
    props = GroundTruthProposals()(_sample(5, 6, instances=inst))
    assert torch.equal(props.masks, inst) and props.scores is None
    assert isinstance(GroundTruthProposals(), MaskProposer)
    with pytest.raises(ValueError, match="img_7.jpg"):
        GroundTruthProposals()(_sample(5, 6))
