"""What a caller gets from a `Prediction`: the mask as PNG and NumPy, a picture, a confidence score."""

import numpy as np
import pytest
import torch
from PIL import Image

from copatch.errors import UserValueError
from copatch.overlay import display_scale
from copatch.types import Prediction, match_score


def _prediction(h=37, w=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(h, w, generator=g) > 0.6
    return Prediction("e1", 7, "the left one", mask, 0, [0, 1], [0.3, 0.1], torch.zeros(0, 4, 4, dtype=torch.bool),
                      iou=0.5, score=0.25)


def test_save_mask_round_trips_as_a_binary_png(tmp_path):
    pred = _prediction()
    path = pred.save_mask(tmp_path / "sub" / "e1.png")
    pixels = np.asarray(Image.open(path))
    assert Image.open(path).mode == "L" and pixels.shape == (37, 53)
    assert set(np.unique(pixels)) == {0, 255}
    assert np.array_equal(pixels > 0, pred.mask.numpy())
    assert [p.name for p in path.parent.iterdir()] == ["e1.png"]  # no temporary file left behind


def test_mask_numpy_is_the_mask():
    pred = _prediction()
    arr = pred.mask_numpy()
    assert arr.dtype == bool and np.array_equal(arr, pred.mask.numpy())


def test_overlay_draws_the_prediction_at_the_documented_size():
    pred = _prediction(64, 80)
    image = np.full((64, 80, 3), 120, dtype=np.uint8)
    proposals = torch.stack([pred.mask, ~pred.mask])
    picture = pred.overlay(image, proposals=proposals, truth=pred.mask.numpy())
    s = display_scale(64, 80)
    assert isinstance(picture, Image.Image) and picture.width == 2 * s * 80 and picture.height > s * 64
    with pytest.raises(UserValueError, match="pass the image the prediction was made on"):
        pred.overlay(np.zeros((10, 10, 3), dtype=np.uint8))


def _reference_score(scores, masks, chosen):
    # Independent: NumPy softmax and set-based IoU.
    s = np.asarray(scores, dtype=np.float64)
    p = np.exp(s - s.max())
    p /= p.sum()
    m = masks.numpy()
    inter = (m & m[chosen]).reshape(len(m), -1).sum(1)
    union = (m | m[chosen]).reshape(len(m), -1).sum(1)
    return float((p * np.where(union > 0, inter / np.maximum(union, 1), 0)).sum())


def test_match_score_is_in_0_1_and_matches_an_independent_computation():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        masks = torch.rand(6, 9, 11, generator=g) > 0.5
        scores = 20 * torch.rand(6, generator=g)
        chosen = int(torch.randint(6, (1,), generator=g))
        value = match_score(scores, masks, chosen)
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(_reference_score(scores, masks, chosen), abs=1e-6)  # IoU is float32


def test_match_score_is_chance_for_equal_scores_and_rises_with_the_chosen_score():
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    for j in range(4):
        masks[j, 2 * j: 2 * j + 2] = True  # disjoint
    assert match_score(torch.zeros(4), masks, 0) == pytest.approx(0.25)
    values = [match_score(torch.tensor([s, 1.0, 0.5, 0.0]), masks, 0) for s in (-2.0, 0.0, 1.0, 3.0, 10.0)]
    assert all(a < b for a, b in zip(values, values[1:])) and values[-1] > 0.99


def test_a_copy_of_the_chosen_mask_does_not_split_its_score():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :4] = True
    masks[1, 4:] = True
    scores = torch.tensor([2.0, 0.0])
    alone = match_score(scores, masks[:2], 0)
    with_copy = match_score(torch.tensor([2.0, 0.0, 2.0]), torch.stack([masks[0], masks[1], masks[0]]), 0)
    assert with_copy > alone  # a plain softmax at the chosen index would drop instead
    assert match_score(torch.tensor([float("nan"), 0.0]), masks[:2], 0) is None


def test_segment_gives_a_score_and_a_picture_for_each_expression():
    from copatch.demo.dataset import demo_image
    from copatch.module import CoPatch

    model = CoPatch.from_preset("demo")
    _, image, _, chosen, proposals = demo_image(seed=1, index=0)
    preds = model.segment(image, [c.text for c in chosen[:2]], proposals=proposals)
    for pred in preds:
        assert pred.score is not None and 0.0 <= pred.score <= 1.0
        picture = pred.overlay(image, proposals=proposals)
        assert picture.width == 2 * display_scale(*image.shape[:2]) * image.shape[1]
