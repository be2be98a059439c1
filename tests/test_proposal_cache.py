"""Tests of `copatch.proposal_cache`: entries keyed by settings, image id and image content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from copatch.errors import UserValueError
from copatch.proposal_cache import ProposalCache, image_sha1, settings_digest
from copatch.proposals import Proposals, StoredProposals

SETTINGS = {"generator": "test", "threshold": 0.35, "min_size": 64}


def _image(seed: int, size: tuple[int, int] = (12, 16)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *size), generator=gen, dtype=torch.uint8)


def _proposals(seed: int, size: tuple[int, int] = (12, 16), n: int = 4) -> Proposals:
    gen = torch.Generator().manual_seed(100 + seed)
    return Proposals(masks=torch.rand(n, *size, generator=gen) > 0.5, scores=torch.rand(n, generator=gen))


def test_image_sha1_is_sha1_of_shape_and_bytes_and_ignores_layout() -> None:
    image = _image(0)
    # Independent computation: the documented definition, by hand.
    expected = hashlib.sha1(b"3x12x16:" + bytes(image.flatten().tolist())).hexdigest()
    assert image_sha1(image) == expected
    channels_last_view = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert not channels_last_view.is_contiguous()
    assert image_sha1(channels_last_view) == expected
    # The same bytes as another shape are another image.
    assert image_sha1(image.reshape(3, 16, 12)) != expected
    changed = image.clone()
    changed[0, 0, 0] ^= 1
    assert image_sha1(changed) != expected


def test_settings_digest_ignores_key_order_but_not_values() -> None:
    assert settings_digest({"a": 1, "b": 0.35}) == settings_digest({"b": 0.35, "a": 1})
    assert settings_digest({"a": 1, "b": 0.35}) != settings_digest({"a": 1, "b": 0.5})
    assert len(settings_digest(SETTINGS)) == 16


def test_round_trip_in_the_stored_proposal_format(tmp_path: Path) -> None:
    cache = ProposalCache(tmp_path, SETTINGS)
    image, proposals = _image(0), _proposals(0)
    assert cache.load(7, image) is None
    path = cache.save(7, image, proposals)
    assert path == tmp_path / settings_digest(SETTINGS) / "7.json" == cache.path(7)
    assert json.loads((cache.folder / "settings.json").read_text()) == SETTINGS
    record = json.loads(path.read_text())
    assert record["image_sha1"] == image_sha1(image) and record["settings_digest"] == cache.digest
    loaded = ProposalCache(tmp_path, dict(reversed(SETTINGS.items()))).load(7, image)
    assert loaded is not None
    assert torch.equal(loaded.masks, proposals.masks) and torch.equal(loaded.scores, proposals.scores)
    # The folder is a stored-proposal folder.
    stored = StoredProposals(cache.folder).load(7, size=(12, 16))
    assert torch.equal(stored.masks, proposals.masks)


def test_colliding_id_same_size_other_content_is_never_served(tmp_path: Path) -> None:
    """A COCO image and a Visual Genome image with the same id and size share one cache_dir."""
    cache = ProposalCache(tmp_path, SETTINGS)
    coco, vg = _image(1), _image(2)
    cache.save(139, coco, _proposals(1))
    with pytest.warns(UserWarning, match=r"139\.json.*another image with id 139") as record:
        assert cache.load(139, vg) is None
    assert str(cache.path(139)) in str(record[0].message)
    # Recomputed and saved: now the entry is the VG image's, and the COCO image is refused in turn.
    cache.save(139, vg, _proposals(2))
    assert torch.equal(cache.load(139, vg).masks, _proposals(2).masks)
    with pytest.warns(UserWarning, match="another image"):
        assert cache.load(139, coco) is None


def test_other_settings_live_apart(tmp_path: Path) -> None:
    image = _image(0)
    ProposalCache(tmp_path, SETTINGS).save(1, image, _proposals(0))
    other = ProposalCache(tmp_path, {**SETTINGS, "threshold": 0.5})
    assert other.folder != ProposalCache(tmp_path, SETTINGS).folder
    assert other.load(1, image) is None


def test_entry_with_other_settings_is_refused_naming_it(tmp_path: Path) -> None:
    image = _image(0)
    source = ProposalCache(tmp_path, SETTINGS)
    source.save(1, image, _proposals(0))
    target = ProposalCache(tmp_path, {**SETTINGS, "threshold": 0.5})
    # An entry copied by hand into the folder of other settings.
    target.folder.mkdir(parents=True)
    target.path(1).write_bytes(source.path(1).read_bytes())
    with pytest.raises(UserValueError, match=r"1\.json was made with other settings") as err:
        target.load(1, image)
    assert str(target.path(1)) in str(err.value)


def test_folder_with_other_settings_file_is_refused(tmp_path: Path) -> None:
    cache = ProposalCache(tmp_path, SETTINGS)
    cache.save(1, _image(0), _proposals(0))
    (cache.folder / "settings.json").write_text(json.dumps({**SETTINGS, "min_size": 800}))
    fresh = ProposalCache(tmp_path, SETTINGS)
    with pytest.raises(UserValueError, match=r"records other settings.*'min_size': \(800, 64\)"):
        fresh.load(1, _image(0))


def test_entry_without_checks_is_refused(tmp_path: Path) -> None:
    cache = ProposalCache(tmp_path, SETTINGS)
    image = _image(0)
    # Written in the plain stored-proposal format (no hash): cannot be checked.
    StoredProposals(cache.folder).write(3, _proposals(0))
    with pytest.raises(UserValueError, match=r"3\.json records no image content hash"):
        cache.load(3, image)


def test_old_layout_cache_is_refused_naming_the_folder(tmp_path: Path) -> None:
    StoredProposals(tmp_path).write(139, _proposals(0))
    (tmp_path / "_mask2former_settings.json").write_text("{}")
    with pytest.raises(UserValueError, match="older copatch") as err:
        ProposalCache(tmp_path, SETTINGS)
    assert str(tmp_path) in str(err.value) and "Delete" in str(err.value)


def test_bad_inputs() -> None:
    cache = ProposalCache("/nonexistent/cache", SETTINGS)
    with pytest.raises(ValueError, match="cannot be used as a file name"):
        cache.path("a/b")
    with pytest.raises(ValueError, match=r"\[3, H, W\] uint8"):
        image_sha1(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="original image size"):
        cache.save(1, _image(0), _proposals(0, size=(6, 8)))
    with pytest.raises(TypeError, match="JSON-able"):
        ProposalCache("/nonexistent/cache", {"dtype": torch.float32})
