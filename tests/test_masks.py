"""Tests of `copatch.masks` against torchvision, a NumPy double loop and pycocotools round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import masks_to_boxes as tv_masks_to_boxes

from copatch import masks as M


def _random_masks(gen: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """A mix of noise, rectangles, single pixels, empty and full masks."""
    out = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out[i] = torch.rand(h, w, generator=gen) < 0.3
        elif kind == 1:
            y0, x0 = (int(torch.randint(0, s, (1,), generator=gen)) for s in (h, w))
            y1 = int(torch.randint(y0, h, (1,), generator=gen)) + 1
            x1 = int(torch.randint(x0, w, (1,), generator=gen)) + 1
            out[i, y0:y1, x0:x1] = True
        elif kind == 2:
            y = int(torch.randint(0, h, (1,), generator=gen))
            out[i, y, int(torch.randint(0, w, (1,), generator=gen))] = True
        elif kind == 3:
            out[i] = True
        # kind 4: empty
    return out


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (32, 17), (64, 64)])
def test_masks_to_boxes_matches_torchvision_on_non_empty(size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    masks = _random_masks(gen, 25, *size)
    boxes = M.masks_to_boxes(masks)
    assert boxes.dtype == torch.int64 and boxes.shape == (25, 4)
    non_empty = masks.flatten(1).any(1)
    assert torch.equal(boxes[non_empty], tv_masks_to_boxes(masks[non_empty]).to(torch.int64))
    assert (boxes[~non_empty] == 0).all()


def test_masks_to_boxes_empty_and_no_masks() -> None:
    boxes = M.masks_to_boxes(torch.zeros(3, 5, 6, dtype=torch.bool))
    assert torch.equal(boxes, torch.zeros(3, 4, dtype=torch.int64))
    assert M.masks_to_boxes(torch.zeros(0, 5, 6, dtype=torch.bool)).shape == (0, 4)
    one = torch.zeros(1, 5, 6, dtype=torch.bool)
    one[0, 4, 5] = True
    assert M.masks_to_boxes(one).tolist() == [[5, 4, 5, 4]]


def _numpy_pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(a), len(b)), dtype=np.float64)
    for i in range(len(a)):
        for j in range(len(b)):
            inter = np.logical_and(a[i], b[j]).sum()
            union = np.logical_or(a[i], b[j]).sum()
            out[i, j] = inter / union if union > 0 else 0.0
    return out


@pytest.mark.parametrize("size", [(1, 1), (9, 11), (40, 33)])
def test_pairwise_iou_matches_numpy(size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = _random_masks(gen, 6, *size), _random_masks(gen, 11, *size)
    iou = M.pairwise_iou(a, b)
    assert iou.dtype == torch.float32 and iou.shape == (6, 11)
    ref = _numpy_pairwise_iou(a.numpy(), b.numpy())
    np.testing.assert_allclose(iou.numpy(), ref.astype(np.float32), rtol=0, atol=0)


def test_pairwise_iou_chunked_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny chunks force many pixel chunks (the path big images take) with the same exact result.
    gen = torch.Generator().manual_seed(2)
    a, b = _random_masks(gen, 4, 23, 19), _random_masks(gen, 7, 23, 19)
    full = M.pairwise_iou(a, b)
    monkeypatch.setattr(M, "_PAIRWISE_BUDGET", 50)
    assert torch.equal(M.pairwise_iou(a, b), full)


def test_pairwise_iou_empty_stacks_and_empty_union() -> None:
    empty = torch.zeros(2, 4, 4, dtype=torch.bool)
    assert torch.equal(M.pairwise_iou(empty, empty), torch.zeros(2, 2))
    assert M.pairwise_iou(torch.zeros(0, 4, 4, dtype=torch.bool), empty).shape == (0, 2)
    assert M.pairwise_iou(empty, torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (2, 0)
    with pytest.raises(ValueError, match="sizes differ"):
        M.pairwise_iou(empty, torch.zeros(1, 4, 5, dtype=torch.bool))


@pytest.mark.parametrize("size", [(1, 1), (3, 7), (17, 5), (31, 29)])
def test_rle_round_trip(size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(3)
    masks = _random_masks(gen, 10, *size)
    rles = M.encode_rle(masks)
    assert len(rles) == 10
    assert all(isinstance(r["counts"], str) and r["size"] == list(size) for r in rles)
    assert torch.equal(M.decode_rle(rles, *size), masks)


def test_rle_is_column_major_like_pycocotools() -> None:
    # A non-symmetric mask: a row-major mix-up would transpose or scramble it.
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    mask[0, 0, 1:4] = True
    from pycocotools import mask as mask_utils

    ref = mask_utils.encode(np.asfortranarray(mask[0].numpy().astype(np.uint8)))
    assert M.encode_rle(mask)[0]["counts"] == ref["counts"].decode("ascii")
    assert mask_utils.area(ref) == 3


def test_rle_no_masks() -> None:
    assert M.encode_rle(torch.zeros(0, 6, 4, dtype=torch.bool)) == []
    out = M.decode_rle([], 6, 4)
    assert out.shape == (0, 6, 4) and out.dtype == torch.bool


def test_decode_rle_rejects_bad_input() -> None:
    rle = M.encode_rle(torch.ones(1, 4, 4, dtype=torch.bool))[0]
    with pytest.raises(ValueError, match="size"):
        M.decode_rle([rle], 4, 5)
    long = M.encode_rle(torch.rand(1, 20, 20, generator=torch.Generator().manual_seed(0)) < 0.5)[0]
    for counts in ["", long["counts"][: len(long["counts"]) // 2], "\x01!"]:
        with pytest.raises(ValueError):
            M.decode_rle([{"size": [20, 20], "counts": counts}], 20, 20)


def test_decode_rle_accepts_uncompressed_counts() -> None:
    # Column-major runs of a 2x3 mask: 1 zero, 2 ones, 3 zeros.
    out = M.decode_rle([{"size": [2, 3], "counts": [1, 2, 3]}], 2, 3)
    assert out[0].tolist() == [[False, True, False], [True, False, False]]


def test_unique_masks_maps_back_exactly():
    from copatch.masks import unique_masks

    g = torch.Generator().manual_seed(0)
    base = torch.rand(5, 9, 11, generator=g) > 0.5
    empty = torch.zeros(1, 9, 11, dtype=torch.bool)
    masks = torch.cat([base, base[[2, 0]], empty, empty, base[[4]]])
    distinct, inverse = unique_masks(masks)
    assert torch.equal(distinct[inverse], masks)
    assert distinct.shape[0] == 6  # 5 distinct random masks + the empty one
    assert inverse.tolist() == [0, 1, 2, 3, 4, 2, 0, 5, 5, 4]
    none, inv = unique_masks(torch.zeros(0, 3, 3, dtype=torch.bool))
    assert none.shape == (0, 3, 3) and inv.numel() == 0


def test_unique_masks_never_merges_on_a_checksum_collision(monkeypatch):
    import copatch.masks as masks_module

    g = torch.Generator().manual_seed(1)
    base = torch.rand(4, 33, 47, generator=g) > 0.5  # 1551 pixels: not a multiple of 256, padded
    masks = torch.cat([base, base[[1, 3]]])
    keys = masks_module._mask_checksums(masks)
    assert keys[0][4] == keys[0][1] and keys[1][5] == keys[1][3]  # duplicates share their checksums
    assert len(set(zip(keys[0].tolist(), keys[1].tolist()))) == 4
    # Every mask colliding: the pixel comparison still keeps the 4 different masks apart.
    monkeypatch.setattr(masks_module, "_mask_checksums", lambda m: (torch.zeros(len(m), dtype=torch.int64),) * 2)
    distinct, inverse = masks_module.unique_masks(masks)
    assert distinct.shape[0] == 4 and inverse.tolist() == [0, 1, 2, 3, 1, 3]
    assert torch.equal(distinct[inverse], masks)


def test_checksums_of_a_view_at_an_odd_offset():
    from copatch.masks import _mask_checksums, unique_masks

    base = torch.rand(1 + 3 * 16 * 16, generator=torch.Generator().manual_seed(2)) > 0.5
    masks = base[1:].view(3, 16, 16)  # contiguous, storage offset 1: no int32 view without a copy
    assert masks.storage_offset() % 4 == 1
    keys = _mask_checksums(masks)
    assert [k.tolist() for k in keys] == [k.tolist() for k in _mask_checksums(masks.clone())]
    distinct, inverse = unique_masks(torch.cat([masks, masks[:1]]))
    assert distinct.shape[0] == 3 and inverse.tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize("size", [(16, 16), (7, 9), (1, 1)])
def test_packed_masks_round_trip_and_match_numpy_bit_order(size):
    from copatch.masks import pack_masks, unpack_masks

    masks = torch.rand(4, *size, generator=torch.Generator().manual_seed(3)) > 0.5
    bits = pack_masks(masks)
    assert bits.dtype == torch.uint8 and bits.shape == (4, -(-size[0] * size[1] // 8))
    # Independent: pixel i of a mask is bit 7 - i % 8 of byte i // 8.
    flat = masks.flatten(1).numpy()
    i = np.arange(flat.shape[1])
    expected = (bits.numpy()[:, i // 8] >> (7 - i % 8)) & 1
    assert (expected == flat).all()
    assert torch.equal(unpack_masks(bits, size), masks)
    assert unpack_masks(pack_masks(masks[:0]), size).shape == (0, *size)


def test_unique_masks_checks_duplicates_in_one_batch_without_a_sync_per_mask(monkeypatch):
    import copatch.masks as masks_module

    g = torch.Generator().manual_seed(2)
    base = torch.rand(6, 20, 30, generator=g) > 0.5
    empty = torch.zeros(40, 20, 30, dtype=torch.bool)  # Mask2Former-like: many empty masks, duplicates
    masks = torch.cat([base, empty, base[[5, 0, 0, 3]], base])
    equal_calls, tolist_calls = [], []
    monkeypatch.setattr(masks_module.torch, "equal", lambda *a: equal_calls.append(1) or True)
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolist_calls.append(1) or original(t))
    distinct, inverse = masks_module.unique_masks(masks)
    monkeypatch.undo()
    assert equal_calls == [] and len(tolist_calls) == 2  # the checksums, then the batched comparison
    assert distinct.shape[0] == 7 and torch.equal(distinct[inverse], masks)
    assert inverse.tolist() == list(range(6)) + [6] * 40 + [5, 0, 0, 3] + list(range(6))
    # All distinct: the stack itself, unchanged.
    distinct, inverse = masks_module.unique_masks(base)
    assert torch.equal(distinct, base) and inverse.tolist() == list(range(6))
