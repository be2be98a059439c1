import numpy as np
import pytest
import torch

from copatch.selection import binarize_clusters, pick_by_score, select_candidates


def _iou_np(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def test_candidates_are_top1_then_best_iou_per_cluster_and_b3_is_dropped():
    torch.manual_seed(0)
    masks = torch.rand(6, 20, 20) > 0.6
    soft = torch.rand(3, 20, 20) * (torch.rand(3, 20, 20) > 0.5)
    scores = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3, 0.0])
    sel = select_candidates(scores, soft, masks)
    assert sel.top1 == 3
    for j in range(3):  # independent: a NumPy double loop over (cluster, proposal)
        ious = [_iou_np(soft[j].numpy() > 0, m.numpy()) for m in masks]
        assert sel.cluster_best[j] == int(np.argmax(ious))
    assert sel.candidates == [3, *sel.cluster_best[:2]]
    assert sel.oracle_pool == [3, *sel.cluster_best]
    kept = select_candidates(scores, soft, masks, keep_last_cluster=True)
    assert kept.candidates == [3, *sel.cluster_best]


def test_soft_cluster_binarisation_rules():
    soft = torch.tensor([[[0.0, 0.2, 0.5, 0.7]]])
    assert binarize_clusters(soft, "positive").tolist() == [[[False, True, True, True]]]
    assert binarize_clusters(soft, "half").tolist() == [[[False, False, False, True]]]


def test_cluster_touching_no_proposal_gives_proposal_0_and_the_list_is_cut_at_n():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, :2, 6:] = True
    soft = torch.zeros(2, 8, 8)
    soft[0, 6:, 3:5] = 1.0  # overlaps nothing
    soft[1, :2, 6:] = 1.0
    sel = select_candidates(torch.tensor([0.2, 0.1]), soft, masks)
    assert sel.cluster_best == [0, 1]
    assert sel.candidates == [0, 0]  # min(k=3, N=2, 3) entries; duplicates stay


def test_no_clusters_leaves_the_top1_alone():
    masks = torch.ones(3, 4, 4, dtype=torch.bool)
    sel = select_candidates(torch.tensor([0.0, 2.0, 1.0]), torch.zeros(0, 4, 4), masks)
    assert sel.candidates == [1] and sel.cluster_best == []


def test_interim_pick_is_the_best_candidate_by_score_first_max():
    masks = torch.ones(4, 4, 4, dtype=torch.bool)
    sel = select_candidates(torch.tensor([0.0, 1.0, 3.0, 3.0]), torch.zeros(0, 4, 4), masks)
    sel.candidates = [1, 3, 2]
    chosen, scores = pick_by_score(sel, torch.tensor([0.0, 1.0, 3.0, 3.0]))
    assert chosen == 3 and scores == [1.0, 3.0, 3.0]


@pytest.mark.parametrize("keep_last", [False, True])
@pytest.mark.parametrize("n, k", [(1, 0), (2, 3), (5, 0), (5, 1), (6, 3), (8, 2)])
def test_the_device_pool_gives_the_same_selection(n, k, keep_last):
    from copatch.selection import candidate_pool, candidates_from_iou, selection_from_pool

    g = torch.Generator().manual_seed(n * 10 + k)
    scores = torch.randint(0, 4, (n,), generator=g).float()  # ties: the first maximum wins
    iou = torch.randint(0, 3, (k, n), generator=g).float() / 2
    expected = candidates_from_iou(scores, iou, top_k=3, keep_last_cluster=keep_last)
    pool, c = candidate_pool(scores, iou, top_k=3, keep_last_cluster=keep_last)
    assert selection_from_pool(pool.tolist(), c, comap=True) == expected


def test_the_device_top_k_pool_gives_the_same_selection():
    from copatch.selection import select_top_k, selection_from_pool, top_k_pool

    scores = torch.tensor([0.5, 2.0, 1.0, 2.0, -1.0])
    for k in (1, 3, 7):
        pool, c = top_k_pool(scores, k)
        assert selection_from_pool(pool.tolist(), c, comap=False) == select_top_k(scores, k)
