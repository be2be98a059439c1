"""Spatial guidance against written-out, loop-by-loop versions of the reference's formulas."""

import math

import pytest
import torch

from copatch.spatial import (boxes_for_relations, coherence_map, coherence_scores, direction_mask, final_pick,
                             relation_scores)


def _rel_loop(box_i, box_j, s_i, s_j, word):
    """The relation term for one pair, with boxes as (x, y, w, h) tuples of floats."""
    cx = lambda b: b[0] + b[2] / 2  # noqa: E731
    cy = lambda b: b[1] + b[3] / 2  # noqa: E731
    if word == "none":
        return s_i
    if word == "left":
        return s_i * s_j * (cx(box_i) < cx(box_j))
    if word == "right":
        return s_i * s_j * (cx(box_i) > cx(box_j))
    if word == "up":
        return s_i * s_j * (cy(box_i) < cy(box_j))
    if word == "down":
        return s_i * s_j * (cy(box_i) > cy(box_j))
    if word == "big":
        return s_i * s_j * (box_i[2] * box_i[3] > box_j[2] * box_j[3])
    if word == "small":
        return s_i * s_j * (box_i[2] * box_i[3] < box_j[2] * box_j[3])
    x1 = max(box_i[0], box_j[0])
    x2 = max(x1, min(box_i[0] + box_i[2], box_j[0] + box_j[2]))
    y1 = max(box_i[1], box_j[1])
    y2 = max(y1, min(box_i[1] + box_i[3], box_j[1] + box_j[3]))
    return s_i * s_j * (x2 - x1) * (y2 - y1) / (box_i[2] * box_i[3])


BOXES = torch.tensor([[0, 0, 9, 9], [20, 5, 39, 30], [5, 40, 15, 59], [30, 30, 60, 60], [2, 2, 5, 5],
                      [50, 0, 63, 20], [10, 10, 40, 40], [0, 0, 63, 63]])


@pytest.mark.parametrize("word", ["none", "left", "right", "up", "down", "big", "small", "within"])
@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize("box_format", ["xyxy_as_xywh", "xywh"])
def test_relation_scores_match_the_loop(word, with_negatives, box_format):
    torch.manual_seed(3)
    logits, neg_logits = torch.randn(8) * 3, torch.randn(8) * 3
    cands = [6, 1, 1]
    sr = relation_scores(cands, BOXES, logits, word, neg_logits if with_negatives else None, box_format)
    sigma, sigma_neg = torch.softmax(logits, 0).tolist(), torch.softmax(neg_logits, 0).tolist()
    if box_format == "xyxy_as_xywh":
        boxes = [tuple(map(float, b)) for b in BOXES.tolist()]  # XYXY read as XYWH, as the reference
    else:
        boxes = [(x1, y1, x2 - x1 + 1.0, y2 - y1 + 1.0) for x1, y1, x2, y2 in BOXES.tolist()]
    others = sorted(range(8), key=lambda i: -sigma_neg[i])[:6] if with_negatives else cands
    scores_j = sigma_neg if with_negatives else sigma
    raw = [sum(_rel_loop(boxes[a], boxes[j], sigma[a], scores_j[j], word) for j in others) for a in cands]
    expected = torch.softmax(torch.tensor(raw, dtype=torch.float32), 0)
    torch.testing.assert_close(sr, expected, rtol=1e-5, atol=1e-6)


def test_reference_box_quirk_changes_left_of():
    # A = x 10..20 and B = x 0..30 share their true centre (15.5): "left of" holds for neither. Read as
    # XYWH, the reference puts A's centre at 10 + 20/2 = 20 and B's at 0 + 30/2 = 15, so B is left of A.
    boxes = torch.tensor([[10, 0, 20, 10], [0, 0, 30, 10]])
    logits = torch.zeros(2)
    quirk = relation_scores([0, 1], boxes, logits, "left")
    fixed = relation_scores([0, 1], boxes, logits, "left", box_format="xywh")
    assert quirk[1] > quirk[0] and torch.equal(fixed[0], fixed[1])


def test_boxes_for_relations():
    b = torch.tensor([[2, 3, 4, 8]])
    assert boxes_for_relations(b).tolist() == [[2.0, 3.0, 4.0, 8.0]]
    assert boxes_for_relations(b, "xywh").tolist() == [[2.0, 3.0, 3.0, 6.0]]


def test_direction_masks():
    assert direction_mask("left", 2, 5)[1].tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert direction_mask("right", 2, 5)[0].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert direction_mask("middle", 1, 5)[0].tolist() == [0.0, 1.0, 1.0, 0.5, 0.0]
    assert (direction_mask("up", 3, 4) == 1).all() and (direction_mask("none", 3, 4) == 1).all()


def test_coherence_on_a_hand_made_heat_map():
    heat = torch.zeros(4, 4)
    heat[:, :2] = 1.0  # hot left half
    weights = coherence_map(heat, (4, 4), "none")
    assert torch.allclose(weights, heat / 0.5)  # min-max is itself; divided by its mean 0.5
    left = torch.zeros(1, 4, 4, dtype=torch.bool)
    left[0, :, :2] = True
    for relation, black in [("none", 1.8), ("big", 1.95), ("small", 1.5)]:
        sc = coherence_scores(weights, left, relation)
        # Per-pixel form of the reference: (2 - black) * mean inside - black * mean outside.
        assert sc.item() == pytest.approx((2 - black) * 2.0 - black * 0.0)
    right = ~left
    assert coherence_scores(weights, right).item() == pytest.approx(-1.8 * 2.0)


def test_coherence_matches_the_per_pixel_formula():
    torch.manual_seed(0)
    heat = torch.rand(28, 28)
    weights = coherence_map(heat, (37, 50), "right")
    masks = torch.rand(5, 37, 50) > 0.7
    got = coherence_scores(weights, masks, "big")
    for m, g in zip(masks.float(), got):
        ref = (weights * (2 - 1.95) * m / m.sum()).sum() - (weights * 1.95 * (1 - m) / (1 - m).sum()).sum()
        assert g.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)


def test_empty_or_full_masks_give_nan_and_nan_wins_the_pick_like_torch_argmax():
    weights = torch.rand(6, 6) + 0.1
    masks = torch.zeros(3, 6, 6, dtype=torch.bool)
    masks[1] = True
    masks[2, :3] = True
    sc = coherence_scores(weights, masks)
    assert math.isnan(sc[0]) and math.isnan(sc[1]) and not math.isnan(sc[2])
    sr = torch.tensor([0.2, 0.3, 0.5])
    assert final_pick([7, 8, 9], sr, sc, 0.7)[0] == 7  # the first NaN wins, as in the reference
    assert final_pick([7, 8, 9], sr, sc, 0.7, nan_policy="loses")[0] == 9


def test_direction_masks_are_cached_rows_of_the_cpu_linspace():
    from copatch.spatial import _direction_row

    for direction in ("left", "right", "middle", "none"):
        first, again = direction_mask(direction, 7, 33), direction_mask(direction, 9, 33)
        assert first.data_ptr() == again.data_ptr()  # one row per width, built once
        assert torch.equal(first, _direction_row(direction, 33).expand(7, 33))
    assert torch.equal(direction_mask("up", 2, 33), direction_mask("none", 2, 33))


def test_final_pick_index_is_final_pick_on_the_device():
    from copatch.spatial import final_pick_index

    sr = torch.tensor([0.2, 0.5, 0.3])
    sc = torch.tensor([0.1, float("nan"), 0.4])
    for policy in ("wins", "loses"):
        chosen, final = final_pick([7, 8, 9], sr, sc, 0.7, policy)
        best, final_t = final_pick_index(sr, sc, 0.7, policy)
        assert [7, 8, 9][int(best)] == chosen
        torch.testing.assert_close(final, final_t, equal_nan=True, rtol=0, atol=0)
