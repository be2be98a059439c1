"""Vectorised helpers on stacks of binary masks: boxes, pairwise IoU and COCO RLE.

Everything works on any device and on empty stacks (`N = 0`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

# float32 represents every integer up to 2**24 exactly, so a 0/1 float32 dot product over at most
# this many pixels is an exact pixel count whatever the summation order.
_EXACT_F32_PIXELS = 2**24
# Elements of float32 operands materialised at once by `pairwise_iou` (~128 MiB).
_PAIRWISE_BUDGET = 2**25


def _check_stack(masks: Tensor, name: str) -> None:
    if masks.ndim != 3:
        raise ValueError(f"{name} must be [N, H, W], got shape {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool mask stack, got dtype {masks.dtype}")


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight boxes of binary masks.

    Args:
        masks: `[N, H, W]` bool.

    Returns:
        `[N, 4]` int64 `(x_min, y_min, x_max, y_max)`, inclusive pixel indices, as
        `torchvision.ops.masks_to_boxes` gives (it returns float) for non-empty masks; an empty mask
        gives `(0, 0, 0, 0)`, as the reference does (older torchvision raises on empty masks).
    """
    _check_stack(masks, "masks")
    n, h, w = masks.shape
    rows = masks.any(dim=2)  # [N, H]: which rows hold a pixel
    cols = masks.any(dim=1)  # [N, W]
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    # Outside the mask, put a sentinel that never wins the min / max.
    y_min = torch.where(rows, ys, h).amin(dim=1)
    y_max = torch.where(rows, ys, -1).amax(dim=1)
    x_min = torch.where(cols, xs, w).amin(dim=1)
    x_max = torch.where(cols, xs, -1).amax(dim=1)
    boxes = torch.stack([x_min, y_min, x_max, y_max], dim=1).to(torch.int64)
    return torch.where(rows.any(dim=1, keepdim=True), boxes, 0)


def mask_areas(masks: Tensor) -> Tensor:
    """`[N, H, W]` bool → `[N]` int64 pixel counts."""
    return masks.flatten(1).sum(1)


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every mask of `a` with every mask of `b`.

    Args:
        a: `[K, H, W]` bool.
        b: `[N, H, W]` bool, same `H, W`.

    Returns:
        `[K, N]` float32; 0 where the union is empty.

    Intersections are float32 matmuls of the flattened 0/1 masks, taken over chunks of at most
    2**24 pixels (where float32 counts are exact) and summed as int64, so counts are exact for any
    image size on any device. The chunk is also bounded so that the float
    operands hold at most ~2**25 elements at once, which bounds memory for many masks on big images.
    Autocast is disabled inside, so a bf16/fp16 context cannot round the counts.
    """
    _check_stack(a, "a")
    _check_stack(b, "b")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"mask sizes differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    k, n = a.shape[0], b.shape[0]
    a_flat, b_flat = a.flatten(1), b.flatten(1)
    pixels = a_flat.shape[1]
    chunk = max(1, min(_EXACT_F32_PIXELS, _PAIRWISE_BUDGET // max(1, k + n)))
    inter = torch.zeros(k, n, dtype=torch.int64, device=a.device)
    with torch.autocast(device_type=a.device.type, enabled=False):
        for start in range(0, pixels, chunk):
            a_c = a_flat[:, start : start + chunk].float()
            b_c = b_flat[:, start : start + chunk].float()
            inter += (a_c @ b_c.T).round().to(torch.int64)
    union = mask_areas(a)[:, None] + mask_areas(b)[None, :] - inter
    # One float32 division of exact counts: correctly rounded while counts are below 2**24, and
    # no float64 (which MPS lacks).
    return torch.where(union > 0, inter.float() / union.clamp_min(1).float(), 0.0)


def encode_rle(masks: Tensor) -> list[dict]:
    """Compressed COCO RLE of each mask.

    Args:
        masks: `[N, H, W]` bool (any device).

    Returns:
        `N` dicts `{"size": [H, W], "counts": str}`: pycocotools' format with `counts` decoded to
        ASCII so the list is JSON-ready. `[]` for `N = 0`.
    """
    _check_stack(masks, "masks")
    if masks.shape[0] == 0:
        return []
    # pycocotools reads an [H, W, N] uint8 array in column-major (Fortran) order.
    array = np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    rles = mask_utils.encode(array)
    return [
        {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles
    ]


def _rle_runs(counts: bytes) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string; ValueError if it is malformed.

    pycocotools decodes a truncated string into uninitialised memory instead of failing, so
    `decode_rle` checks the runs first. Format: each run is a little-endian sequence of 5-bit
    groups stored as `chr(48 + group)`, bit 0x20 meaning "more groups follow" and bit 0x10 of the
    last group the sign; from the third run on, the value is a delta from the run two places before.
    """
    v = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if v.size == 0 or v.min() < 0 or v.max() > 63 or v[-1] & 0x20:
        raise ValueError("malformed RLE counts")
    end = (v & 0x20) == 0
    starts = np.flatnonzero(np.concatenate([[True], end[:-1]]))
    group = np.cumsum(np.concatenate([[0], end[:-1]]))
    k = np.arange(v.size) - starts[group]  # position of each 5-bit group inside its run
    if k.max() > 11:  # more than 60 bits: not a pixel count
        raise ValueError("malformed RLE counts")
    runs = np.add.reduceat((v & 0x1F) << (5 * k), starts)
    negative = (v[end] & 0x10) != 0
    runs[negative] -= np.int64(1) << (5 * (k[end][negative] + 1))  # sign-extend
    runs[1::2] = np.cumsum(runs[1::2])  # undo the deltas: x[i] += x[i - 2] for i > 2
    runs[2::2] = np.cumsum(runs[2::2])
    return runs


def decode_rle(rles: list[dict], height: int, width: int) -> Tensor:
    """Inverse of `encode_rle`.

    Args:
        rles: COCO RLE dicts (`counts` as str or bytes; an uncompressed list of run lengths is also
            accepted), each of size `[height, width]`.
        height, width: the image size, needed for `N = 0` and checked against each RLE.

    Returns:
        `[N, height, width]` bool on the CPU. Raises ValueError on a wrong size or malformed counts.
    """
    if len(rles) == 0:
        return torch.zeros(0, height, width, dtype=torch.bool)
    objs = []
    for i, rle in enumerate(rles):
        size = [int(s) for s in rle["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE {i} has size {size}, expected [{height}, {width}]")
        counts = rle["counts"]
        if isinstance(counts, list):  # uncompressed RLE: compress it first
            counts = mask_utils.frPyObjects(rle, height, width)["counts"]
        counts = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
        runs = _rle_runs(counts)
        if runs.min() < 0 or runs.sum() != height * width:
            raise ValueError(f"RLE {i} does not cover the {height}x{width} image")
        objs.append({"size": size, "counts": counts})
    with warnings.catch_warnings():
        # pycocotools' Cython decode trips NumPy 2's `__array__(copy=...)` DeprecationWarning.
        warnings.filterwarnings(
            "ignore", message=".*__array__ implementation", category=DeprecationWarning
        )
        array = mask_utils.decode(objs)  # [H, W, N] uint8 of 0/1
    # Reinterpreted as bool (the bytes are 0/1) before the one copy that makes each mask contiguous.
    return torch.from_numpy(array.view(np.bool_)).permute(2, 0, 1).contiguous()


def unique_masks(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct masks and where each input mask went: `[N, H, W] bool -> ([U, H, W], [N] int64)`.

    `unique[inverse]` equals `masks` exactly. Masks are grouped by two integer checksums of their
    pixels, then each group is confirmed pixel for pixel, so a checksum collision can never merge two
    different masks. Mask2Former's 200 queries hold many empty and duplicate masks, and every mask
    costs a CLIP pass, so this saves work without changing any result.
    """
    _check_stack(masks, "masks")
    n = masks.shape[0]
    if n == 0:
        return masks, torch.zeros(0, dtype=torch.int64, device=masks.device)
    keys = list(zip(*torch.stack(_mask_checksums(masks)).tolist()))  # one transfer
    # Every mask whose checksums were seen before is compared with the first mask of those checksums, all
    # in one batched comparison (one more transfer), instead of one `torch.equal` (a sync) per mask.
    first: dict[tuple[int, int], int] = {}
    pairs = [(i, first.setdefault(key, i)) for i, key in enumerate(keys)]
    pairs = [(i, j) for i, j in pairs if i != j]
    if pairs and all(_equal_pairs(masks, pairs)):
        kept = sorted(set(first.values()))
        slot = {i: u for u, i in enumerate(kept)}
        inverse = [slot[first[key]] for key in keys]
        return _take(masks, kept), torch.tensor(inverse, dtype=torch.int64).to(masks.device, non_blocking=True)
    if not pairs:
        return masks, torch.arange(n, device=masks.device)
    # A checksum collision (two different masks with the same checksums): confirm pixel for pixel.
    first_of: dict[tuple[int, int], list[int]] = {}
    inverse = [0] * n
    kept: list[int] = []
    for i, key in enumerate(keys):
        for u in first_of.get(key, []):
            if torch.equal(masks[kept[u]], masks[i]):
                inverse[i] = u
                break
        else:
            first_of.setdefault(key, []).append(len(kept))
            inverse[i] = len(kept)
            kept.append(i)
    return masks[kept], torch.tensor(inverse, dtype=torch.int64, device=masks.device)


# Pixels compared at once by `_equal_pairs` (bool elements of each side, ~64 MiB).
_EQUAL_BUDGET = 2**26


def _equal_pairs(masks: Tensor, pairs: list[tuple[int, int]]) -> list[bool]:
    """Whether `masks[i]` equals `masks[j]` pixel for pixel, for each `(i, j)`: batched comparisons
    (in chunks that bound memory) and one transfer of the answers."""
    pixels = max(1, masks.shape[1] * masks.shape[2])
    chunk = max(1, _EQUAL_BUDGET // pixels)
    index = torch.tensor(pairs, dtype=torch.int64).to(masks.device, non_blocking=True)
    differs = []
    for start in range(0, len(pairs), chunk):
        a, b = index[start:start + chunk, 0], index[start:start + chunk, 1]
        differs.append((masks.index_select(0, a) != masks.index_select(0, b)).flatten(1).any(1))
    return [not d for d in torch.cat(differs).tolist()]


def _take(masks: Tensor, rows: list[int]) -> Tensor:
    """`masks[rows]` with one index copy (a slice when the rows are all of them)."""
    if len(rows) == masks.shape[0]:
        return masks
    return masks.index_select(0, torch.tensor(rows, dtype=torch.int64).to(masks.device, non_blocking=True))


def _mask_checksums(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Two exact int64 checksums per mask of an `[N, H, W]` bool stack.

    The bool pixels are reinterpreted (no copy) as int32 words of 4 pixels; words are summed in blocks
    of 64 (256 pixels), and the checksums are the plain and the block-position-weighted sums of the
    block sums. Words are below 2**25, block sums below 2**31 and weights below 2**16, so nothing
    overflows int64 below 2**16 blocks (16.7M pixels) a mask. Far cheaper than a float projection
    of the stack (~60M pixels for 200 masks of 640 x 480), and the pixel comparison after it makes
    any collision harmless.
    """
    flat = masks.flatten(1).contiguous().view(torch.uint8)
    pad = (-flat.shape[1]) % 256
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    elif flat.storage_offset() % 4:  # an int32 view needs 4-byte alignment (e.g. a view into a larger stack)
        flat = flat.clone()
    blocks = flat.view(torch.int32).view(flat.shape[0], -1, 64).sum(2, dtype=torch.int64)  # [N, B]
    weights = torch.arange(blocks.shape[1], device=masks.device) % 65521 + 1
    return blocks.sum(1), (blocks * weights).sum(1)


# Bit weights of one packed byte, most significant first (NumPy's `packbits` order).
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_masks(masks: Tensor) -> Tensor:
    """`[N, H, W]` bool -> `[N, ceil(H*W / 8)]` uint8, 8 pixels a byte (row-major), on the CPU.

    An eighth of the bytes: what DataLoader workers send through shared memory and what is copied
    to the GPU, where `unpack_masks` restores the masks.
    """
    _check_stack(masks, "masks")
    return torch.from_numpy(np.packbits(masks.flatten(1).cpu().numpy(), axis=1))


def unpack_masks(bits: Tensor, size: tuple[int, int]) -> Tensor:
    """Inverse of `pack_masks`: `[N, B]` uint8 -> `[N, H, W]` bool, on `bits`' device."""
    h, w = size
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    flat = (bits.unsqueeze(-1) & weights) != 0  # [N, B, 8]
    return flat.reshape(bits.shape[0], bits.shape[1] * 8)[:, : h * w].reshape(bits.shape[0], h, w)
