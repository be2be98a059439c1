"""ColourRegionProposer: its regions against SciPy's labelling, its filters, and the demo preset using it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from copatch.demo.dataset import demo_image
from copatch.demo.proposer import ColourRegionProposer, connected_regions
from copatch.module import CoPatch
from copatch.types import ImageSample

ndimage = pytest.importorskip("scipy.ndimage")


def _scipy_regions(image: np.ndarray) -> set[bytes]:
    """Exact-colour 4-connected regions, computed independently: per distinct colour, SciPy's label."""
    out = set()
    colours = np.unique(image.reshape(-1, image.shape[2]), axis=0)
    for colour in colours:
        labels, count = ndimage.label((image == colour).all(-1))  # default structure: 4-connectivity
        out |= {(labels == k).tobytes() for k in range(1, count + 1)}
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regions_equal_scipy_labelling(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 3, size=(23, 31, 3), dtype=np.uint8)  # few colours: many ragged regions
    image[5:15, 4:20] = (7, 7, 7)  # a flat block
    labels = connected_regions(image)
    mine = {(labels == k).tobytes() for k in range(labels.max() + 1)}
    assert mine == _scipy_regions(image)
    # Numbered in raster order of first pixels.
    first = [int(np.flatnonzero(labels.reshape(-1) == k)[0]) for k in range(labels.max() + 1)]
    assert first == sorted(first)


def test_tolerance_joins_near_colours_only():
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    image[:, 3:] = 2  # two halves 2 apart
    assert connected_regions(image, tolerance=1).max() == 1
    assert connected_regions(image, tolerance=2).max() == 0


def test_filters_and_same_colour_union():
    image = np.full((100, 100, 3), 128, dtype=np.uint8)  # flat background: 100 % > max_area, dropped
    image[10:30, 10:30] = (200, 0, 0)  # 400 px
    image[10:30, 60:80] = (200, 0, 0)  # the same colour, apart: also proposed together
    image[60:90, 40:70] = (0, 0, 200)  # 900 px
    image[95:97, 95:97] = (0, 200, 0)  # 4 px speck: below min_area (40 px)
    sample = ImageSample(image_id=1, image=torch.from_numpy(image).permute(2, 0, 1), expressions=[])
    masks = ColourRegionProposer()(sample).masks.numpy()
    blue = np.zeros((100, 100), bool)
    blue[60:90, 40:70] = True
    left, right = np.zeros_like(blue), np.zeros_like(blue)
    left[10:30, 10:30] = True
    right[10:30, 60:80] = True
    # Largest first (ties in raster order), then the same-colour union.
    assert [m.tobytes() for m in masks] == [m.tobytes() for m in (blue, left, right, left | right)]
    assert len(ColourRegionProposer(merge_same_colour=False).masks(image)) == 3
    assert len(ColourRegionProposer(max_area=1.0).masks(image)) == 4 + 1  # the background is kept too


def test_every_demo_object_is_a_proposal():
    proposer = ColourRegionProposer()
    for index in range(6):
        _, image, masks, _, _ = demo_image(seed=1, index=index)
        props = proposer.masks(image)
        for gt in masks:  # visible masks, occluded ones included
            inter = (props & gt).reshape(len(props), -1).sum(1)
            union = (props | gt).reshape(len(props), -1).sum(1)
            assert (inter / union).max() >= 0.9


def test_demo_preset_segments_without_given_proposals():
    model = CoPatch.from_preset("demo")
    assert isinstance(model.proposer, ColourRegionProposer)
    _, image, masks, chosen, _ = demo_image(seed=1, index=12)
    case = next(c for c in chosen if c.text == "the red circle")
    pred = model.segment(image, case.text)[0]
    assert torch.equal(pred.mask, torch.from_numpy(masks[case.target]))


def test_the_config_builds_the_default_proposer():
    from pathlib import Path

    config = yaml.safe_load((Path(__file__).parents[2] / "configs/proposers/demo_regions.yaml").read_text())
    args = config["model"]["proposer"]["init_args"]
    assert repr(ColourRegionProposer(**args)) == repr(ColourRegionProposer())
