import numpy as np
import pytest
import torch
from scipy import ndimage

from copatch.comap import (REFERENCE_LOGIT_SCALE, cluster_patches, order_cluster_ids, similarity_map,
                           upsample_clusters, visit_order)


def _grid(values: dict[tuple[int, int], float], g: int = 4, rest: float = 0.0) -> torch.Tensor:
    """Logit-scale scores `S` of a g x g grid, given on the `S / 100` scale of the thresholds."""
    score = torch.full((g, g), rest * 100)
    for (r, c), v in values.items():
        score[r, c] = v * 100
    return score.flatten()


def _partition(labels: torch.Tensor) -> set[frozenset[int]]:
    flat = labels.flatten().tolist()
    return {frozenset(i for i, l in enumerate(flat) if l == cid) for cid in set(flat) - {0}}


def test_greedy_growth_never_merges_clusters():
    # A(0,0) .9 and B(0,3) .85 seed two clusters; B2(1,3) joins B; C(0,1) joins A; D(0,2) touches both
    # C and B but takes the id of its first visited neighbour (B) and the two clusters stay apart.
    score = _grid({(0, 0): .9, (0, 3): .85, (1, 3): .8, (0, 1): .75, (0, 2): .7}, rest=0.1)
    clusters = cluster_patches(score, 4, delta=0.3)
    assert clusters.threshold == 0.3 - 0.05
    assert _partition(clusters.labels) == {frozenset({0, 1}), frozenset({3, 7, 2})}
    bfs = cluster_patches(score, 4, delta=0.3, method="bfs")
    assert _partition(bfs.labels) == {frozenset({0, 1, 2, 3, 7})}


def test_singleton_takes_the_id_of_a_later_neighbour():
    # B(0,2) is visited before C(0,1); C joins A (its first visited neighbour), leaving B a singleton
    # whose later neighbour C gives it A's id.
    score = _grid({(0, 0): .9, (0, 2): .8, (0, 1): .7}, rest=0.1)
    clusters = cluster_patches(score, 4, delta=0.3)
    assert _partition(clusters.labels) == {frozenset({0, 1, 2})}
    assert clusters.order == [1]


def test_the_lowest_patch_is_never_visited():
    score = torch.linspace(90.0, 50.0, 16)  # every patch above the threshold
    clusters = cluster_patches(score, 4, delta=0.3)
    flat = clusters.labels.flatten()
    assert flat[15] == 0 and (flat[:15] == 1).all()
    bfs = cluster_patches(score, 4, delta=0.3, method="bfs")
    assert (bfs.labels == 1).all()


def test_threshold_steps_down_in_float64_until_something_clusters():
    score = torch.full((16,), 12.0)  # S / 100 = float32(0.12)
    clusters = cluster_patches(score, 4, delta=0.3)
    expected = 0.3
    for _ in range(4):  # 0.25, 0.2, 0.15000000000000002, 0.10000000000000003
        expected -= 0.05
    assert clusters.threshold == expected and clusters.threshold != 0.1
    # starting at delta itself tries 0.3 first, then the same steps
    assert cluster_patches(score, 4, delta=0.3, first_threshold="delta").threshold == expected


def test_ties_go_to_the_lower_index():
    score = _grid({(0, 3): .9, (3, 0): .9}, rest=0.0)
    clusters = cluster_patches(score, 4, delta=0.3)
    assert clusters.labels.flatten()[3] == 1 and clusters.labels.flatten()[12] == 2


def test_visit_order_sorts_logit_scores_not_the_divided_ones():
    # Two scores one float32 step apart that S / 100 maps onto one value: the reference sorts S, so the
    # larger one (at the higher index 12) is visited first and gets cluster id 1; a sort of S / 100
    # would see a tie and visit the lower index 3 first.
    low = np.float32(12.500000953674316)
    high = np.nextafter(low, np.float32(np.inf))
    assert high > low and high / np.float32(100) == low / np.float32(100)  # the division merges them
    score = torch.zeros(16)
    score[3], score[12] = float(low), float(high)
    assert visit_order(score)[:2].tolist() == [12, 3]
    assert visit_order(score / 100)[:2].tolist() == [3, 12]  # what sorting S / 100 would give
    for method in ("greedy", "bfs"):
        clusters = cluster_patches(score, 4, delta=0.3, method=method)
        flat = clusters.labels.flatten()
        assert (flat[12].item(), flat[3].item()) == (1, 2)
        assert clusters.order == [1, 2]
        assert clusters.masks(1)[0].flatten().nonzero().flatten().tolist() == [12]  # b_1 holds patch 12
        assert clusters.threshold == 0.3 - 0.05 - 0.05 - 0.05 - 0.05  # 0.125 clusters at 0.1000...03


@pytest.mark.parametrize("seed", range(8))
def test_bfs_equals_scipy_label_with_8_connectivity(seed):
    rng = np.random.default_rng(seed)
    g = 14
    score = torch.from_numpy(rng.uniform(-20, 60, size=g * g).astype(np.float32))
    clusters = cluster_patches(score, g, delta=0.3, method="bfs", order_by="seed_score")
    high = (score.numpy() / np.float32(100) > np.float32(clusters.threshold)).reshape(g, g)
    labelled, n = ndimage.label(high, structure=np.ones((3, 3)))
    assert _partition(clusters.labels) == _partition(torch.from_numpy(labelled))
    # seed_score order: cluster 1 holds the best patch, and clusters rank by their best patch.
    best = [score[clusters.labels.flatten() == cid].max().item() for cid in clusters.order]
    assert best == sorted(best, reverse=True) and len(best) == n


def test_python_set_order():
    assert order_cluster_ids([1, 1, 3, 10, 3], "python_set") == [1, 10, 3]
    assert order_cluster_ids([1, 1, 3, 10, 3], "seed_score") == [1, 3, 10]


def test_similarity_normalises_over_patches_by_default():
    torch.manual_seed(0)
    patches, text = torch.randn(16, 8), torch.randn(2, 8)
    by_patch = patches / patches.norm(dim=0, keepdim=True)
    expected = (REFERENCE_LOGIT_SCALE * by_patch @ (text / text.norm(dim=1, keepdim=True)).T).T
    torch.testing.assert_close(similarity_map(patches, text), expected)  # logit scale, not / 100
    cosine = torch.nn.functional.cosine_similarity(patches[None], text[:, None], dim=-1)
    torch.testing.assert_close(similarity_map(patches, text, "channels") / 100, cosine, rtol=1e-5, atol=1e-6)
    assert REFERENCE_LOGIT_SCALE == 100.00000762939453


def test_upsampling_is_bilinear_with_aligned_corners():
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = True
    soft = upsample_clusters(masks, (31, 31))  # patch centres land on pixels 0, 10, 20, 30
    assert soft[0, 0, 0] == 1 and soft[0, 10, 0] == 0 and soft[0, 0, 10] == 0
    torch.testing.assert_close(soft[0, 5, 0], torch.tensor(0.5))
    assert (soft[0, :10, :10] > 0).all() and (soft[0, 10:] == 0).all()
