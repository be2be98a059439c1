"""SAM candidate masks: the automatic mask generator of segment-anything, on transformers' `SamModel`.

HybridGL (and other SAM-based zero-shot RIS methods) make their candidates with segment-anything's
`SamAutomaticMaskGenerator`. This module reproduces that generator (single crop, `crop_n_layers=0`)
around the Hugging Face port of SAM (`transformers.SamModel`), loaded from a local folder holding the
files of `facebook/sam-vit-huge`, `-large` or `-base` (config, weights, processor config); nothing
is downloaded.

Pipeline for an image `[3, H, W] uint8` RGB (one `Proposals` per image):

1. Resize so that the long side is `L` (the processor's `size.longest_edge`, 1024), each side
   rounded half up, bilinear with PIL on the uint8 image (segment-anything's `ResizeLongestSide`)
   -> `[3, h, w]`; normalise with the processor's mean/std (ImageNet, in 0..255 units) and zero-pad
   bottom-right to `[3, 1024, 1024]` (the processor's `pad_size`).
2. The vision encoder runs once per image (all images of a `propose_batch` call in one forward)
   -> image embedding `[B, 256, 64, 64]`.
3. Prompts: a regular grid of `points_per_side**2` points (cell centres, `x` fastest), scaled to the
   original image, then to the resized frame. They go through the prompt encoder and mask decoder
   `points_per_batch` at a time, one positive point per prompt, 3 masks per point
   (`multimask_output=True`) -> low-res logits `[P, 3, 256, 256]` and predicted IoUs `[P, 3]`.
4. Per batch, in float32: keep masks with predicted IoU `> pred_iou_thresh`; upsample their logits
   bilinearly to the padded `1024 x 1024`, crop the valid `h x w`, resize to `H x W` (SAM's
   `postprocess_masks`); stability score = `#(logit > t + offset) / #(logit > t - offset)` with
   `t = mask_threshold` (0.0), keep `>= stability_score_thresh`; binarise `logit > t`; box = the
   mask's `[x0, y0, x1, y1]` with inclusive pixel coordinates (`[0, 0, 0, 0]` for an empty mask).
5. Box NMS over all kept masks of the image (`torchvision.ops.batched_nms`, one category, scores =
   predicted IoU, `box_nms_thresh`), giving SAM's order (decreasing predicted IoU).
6. If `min_mask_region_area > 0`: in every mask, fill holes and then drop islands smaller than that
   area (8-connected components); a mask where that changed anything gets score 0, the others 1, and
   a second box NMS on the new boxes with those scores keeps unchanged masks over changed
   near-duplicates (SAM's `postprocess_small_regions`).

Result: `Proposals(masks=[N, H, W] bool, scores=[N] float32 predicted IoU or None)`. Unlike the
Mask2Former proposer, SAM's generator filters, so `N` varies from image to image (it may be 0).

Not done here (departures from `SamAutomaticMaskGenerator`): multi-crop generation
(`crop_n_layers > 0`, HybridGL's PhraseCut setting) and `point_grids` given by hand; the output is
the binary masks (no RLE / `output_mode`).

SAM 2 (`transformers.Sam2Model`, a folder with the files of e.g. `facebook/sam2.1-hiera-large`) runs
the same generator as sam2's `SAM2AutomaticMaskGenerator`: the image is resized to `1024 x 1024`
without keeping its aspect ratio (torchvision bilinear with antialias on the [0, 1] image), points are
scaled by `1024 / W`, `1024 / H`, low-res logits go straight to `H x W`, and `pred_iou_thresh`
defaults to 0.8. `min_mask_region_area` is refused there (sam2 also fills holes in the low-res
logits, not done here); `use_m2m` is not supported.

`transformers` is an optional dependency (`pip install "copatch[sam]"` installs it);
importing this module does not need it, building a proposer does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import batched_nms

from copatch.errors import UserFileNotFound, UserValueError, knob
from copatch.mask2former import _CONFIG_FILE, _UPSAMPLE_BUDGET, _WEIGHT_FILES, _parse_dtype, resize_uint8
from copatch.model_proposer import ModelProposer
from copatch.proposals import Proposals
from copatch.types import ImageSample

if TYPE_CHECKING:  # pragma: no cover
    from transformers import SamConfig, SamProcessor

REFERENCE_CHECKPOINT = "facebook/sam-vit-huge"  # HybridGL's SAM (ViT-H)
# segment-anything's `SamAutomaticMaskGenerator` defaults.
POINTS_PER_SIDE = 32
POINTS_PER_BATCH = 64
PRED_IOU_THRESH = 0.88
# sam2's `SAM2AutomaticMaskGenerator` default (tuned for SAM 2); everything else is shared.
PRED_IOU_THRESH_SAM2 = 0.8
STABILITY_SCORE_THRESH = 0.95
STABILITY_SCORE_OFFSET = 1.0
BOX_NMS_THRESH = 0.7
# SAM binarises its mask logits at 0 (`Sam.mask_threshold`).
MASK_THRESHOLD = 0.0

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# _CONFIG_FILE, _WEIGHT_FILES: the files of a transformers model folder, as for Mask2Former.
# _UPSAMPLE_BUDGET bounds post-processing memory: SAM upsamples a whole batch (192 masks) at once,
# ~9 GB at 4000 x 3000 unchunked; chunking changes no value.


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "SamProposer needs the Hugging Face `transformers` package, which is not installed "
            f"({err}). Install it with: pip install \"copatch[sam]\""
        ) from err
    return transformers


def _fetch_hint(path: Path | None = None) -> str:
    """The command that fetches SAM weights into `path` (`copatch.downloads`: the size the folder's
    name says, `vit-base` when it says none), ending with where they go."""
    name = path.name.lower() if path is not None else ""
    size = next((s for s in ("huge", "large", "base") if s in name), "base")
    try:
        from copatch.downloads import fetch_hint

        return str(fetch_hint(f"sam-vit-{size}", None if path is None else str(path)))
    except (ImportError, KeyError):  # no table (or no SAM entry in it): our own example
        dest = path if path is not None else f"weights/sam-vit-{size}"
        return (f"On a machine with internet run `hf download facebook/sam-vit-{size} --local-dir {dest}` "
                "and copy the folder here; nothing is downloaded at run time.")


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """The folder as a `Path` if it holds `config.json`, a processor config and weights, else a
    `UserFileNotFound` naming the folder and the command that fetches it."""
    path = Path(model_dir).expanduser()
    problem = None
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "does not exist"
    elif not (path / _CONFIG_FILE).is_file():
        problem = f"has no {_CONFIG_FILE}"
    elif not any((path / name).is_file() for name in _PROCESSOR_FILES):
        problem = f"has no processor config ({' or '.join(_PROCESSOR_FILES)})"
    elif not any((path / name).is_file() for name in _WEIGHT_FILES):
        problem = f"has no weights (none of {', '.join(_WEIGHT_FILES)})"
    if problem is not None:
        raise UserFileNotFound(
            f"SAM model folder {path} {problem} (set {knob('proposer.init_args.model_dir')} to a folder "
            f"with the files of facebook/sam-vit-huge, -large or -base). {_fetch_hint(path)}"
        )
    return path


def longest_side_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """segment-anything's `ResizeLongestSide.get_preprocess_shape`: `(h, w)` with the long side
    `longest`, each side rounded half up."""
    scale = longest * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def point_grid(points_per_side: int) -> Tensor:
    """`[n*n, 2]` float64 `(x, y)` in [0, 1]: cell centres of an `n x n` grid, `x` varying fastest
    (segment-anything's `build_point_grid`)."""
    offset = 1.0 / (2 * points_per_side)
    side = torch.linspace(offset, 1.0 - offset, points_per_side, dtype=torch.float64)
    xs = side[None, :].expand(points_per_side, -1)
    ys = side[:, None].expand(-1, points_per_side)
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """`[N, H, W] bool` -> `[N, 4]` float32 `[x0, y0, x1, y1]`, inclusive pixel coordinates (as SAM's
    `batched_mask_to_box`: a one-pixel mask has `x0 == x1`); an empty mask gives zeros."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    h, w = masks.shape[-2:]
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [N, H], [N, W]
    y = torch.arange(h, device=masks.device)
    x = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, y, -1).amax(dim=1)
    y0 = torch.where(rows, y, h).amin(dim=1)
    x1 = torch.where(cols, x, -1).amax(dim=1)
    x0 = torch.where(cols, x, w).amin(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    empty = ~rows.any(dim=1)
    return torch.where(empty[:, None], 0, boxes).float()


def stability_scores(logits: Tensor, threshold: float, offset: float) -> Tensor:
    """`[N, H, W]` logits -> `[N]`: IoU of the masks binarised at `threshold + offset` and at
    `threshold - offset` (the first lies inside the second, so it is a ratio of pixel counts)."""
    inner = (logits > threshold + offset).flatten(1).sum(dim=1, dtype=torch.int64)
    outer = (logits > threshold - offset).flatten(1).sum(dim=1, dtype=torch.int64)
    # SAM divides 0 / 0 too (NaN, then dropped by `>=`); say so instead of warning.
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.nan)


def _union_find(n: int, u: Tensor, v: Tensor) -> Tensor:
    """Roots `[n]` (each node's smallest connected index) of the graph on `n` nodes with edges `u`-`v`.

    Each round hooks, for every edge whose ends have different roots, the larger root under the
    smaller (`scatter_reduce` amin), then compresses every path to its root (pointer jumping), until
    every edge joins nodes of one root. Roots only ever point lower, so there is no cycle.
    """
    parent = torch.arange(n, device=u.device)
    while True:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not bool(differ.any()):
            return parent
        lo, hi = torch.minimum(pu, pv)[differ], torch.maximum(pu, pv)[differ]
        parent.scatter_reduce_(0, hi, lo, reduce="amin")  # hi is a root: it now points lower
        while True:  # full path compression
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped
        u, v = u[differ], v[differ]  # edges already inside one root stay so


def _run_components(mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The horizontal runs of a `[H, W] bool` mask and their 8-connected components.

    Returns `rows`, `starts`, `ends` (exclusive) and `root` of every run, `[R]` int64 each, runs in
    raster order; `root` is the index of the component's first run. Working on runs rather than
    pixels (a blob has a couple per row) keeps the graph small: plain torch, no OpenCV or scipy.
    """
    h, w = mask.shape
    edges = torch.diff(F.pad(mask.to(torch.int8), (1, 1)), dim=1)  # [H, W + 1]: +1 start, -1 end
    rows, starts = (edges == 1).nonzero(as_tuple=True)
    _, ends = (edges == -1).nonzero(as_tuple=True)  # same row-major order: pairs with `starts`
    n = rows.numel()
    if n == 0:
        return rows, starts, ends, rows.clone()
    # Run a (row r, cols s_a..e_a-1) touches run b of row r + 1 (8-connectivity) iff s_b <= e_a and
    # s_a <= e_b. Runs are sorted by (row, col), so the b of each a form one contiguous range.
    stride = w + 2
    key_start, key_end = rows * stride + starts, rows * stride + ends
    first = torch.searchsorted(key_end, (rows + 1) * stride + starts, side="left")
    last = torch.searchsorted(key_start, (rows + 1) * stride + ends, side="right") - 1
    count = (last - first + 1).clamp(min=0)
    u = torch.repeat_interleave(torch.arange(n, device=mask.device), count)
    offset = torch.arange(u.numel(), device=mask.device) - torch.repeat_interleave(count.cumsum(0) - count, count)
    v = first[u] + offset
    return rows, starts, ends, _union_find(n, u, v)


def _paint(shape: tuple[int, int], rows: Tensor, starts: Tensor, ends: Tensor, values: Tensor) -> Tensor:
    """`[H, W] int64` with `values[k]` on run k and 0 elsewhere (runs are disjoint)."""
    h, w = shape
    canvas = torch.zeros(h, w + 1, dtype=torch.int64, device=rows.device)
    canvas.index_put_((rows, starts), values, accumulate=True)
    canvas.index_put_((rows, ends), -values, accumulate=True)
    return canvas.cumsum(dim=1)[:, :w]


def connected_components(mask: Tensor) -> Tensor:
    """8-connected components of a `[H, W] bool` mask -> `[H, W] int64`: 0 outside the mask, inside
    one label per component (1 + the index of its first horizontal run in raster order)."""
    rows, starts, ends, root = _run_components(mask)
    return _paint(tuple(mask.shape), rows, starts, ends, root + 1)


def remove_small_regions(mask: Tensor, min_area: int, mode: str) -> tuple[Tensor, bool]:
    """SAM's `remove_small_regions` on a `[H, W] bool` mask: `mode="holes"` fills the 8-connected
    background components smaller than `min_area` (the outside included, when it is that small),
    `"islands"` drops the mask components smaller than it, keeping the largest (the first in raster
    order on a tie) if all are. Returns the new mask and whether any small region was found."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    working = ~mask if holes else mask
    rows, starts, ends, root = _run_components(working)
    n = rows.numel()
    sizes = torch.zeros(n, dtype=torch.int64, device=mask.device).scatter_add_(0, root, ends - starts)
    is_root = root == torch.arange(n, device=mask.device)
    small = is_root & (sizes < min_area)  # per component, indexed by its root
    if not bool(small.any()):
        return mask, False
    if holes:
        fill = small[root]
        return mask | _paint(tuple(mask.shape), rows[fill], starts[fill], ends[fill],
                             torch.ones_like(rows[fill])).bool(), True
    large = is_root & ~small
    if not bool(large.any()):
        # Every island is small: keep the largest; on a tie the first found in raster order (the
        # smallest root), as `np.argmax` over OpenCV's raster-ordered labels does.
        biggest = torch.where(is_root, sizes, -1)
        large = torch.zeros_like(is_root)
        large[int(biggest.argmax())] = True  # argmax returns the first maximum
    keep = large[root]
    return _paint(tuple(mask.shape), rows[keep], starts[keep], ends[keep], torch.ones_like(rows[keep])).bool(), True


@dataclass(frozen=True)
class SamInput:
    """SAM's resize (long side to `longest`) as a `copatch.prepare.PrepareStep` for DataLoader workers."""

    longest: int = 1024

    def key(self, size: tuple[int, int]) -> str:
        h, w = longest_side_size(*size, self.longest)
        return f"sam:{h}x{w}"

    def __call__(self, sample: ImageSample) -> Tensor:
        """The sample's `image` `[3, H, W] uint8` -> `[3, h, w] uint8` on the CPU."""
        image = sample.image
        return resize_uint8(image, longest_side_size(*image.shape[-2:], self.longest))


def _size_value(size: Any, key: str) -> int | None:
    """A field of a processor size (a dict in transformers 4, a `SizeDict` in 5)."""
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return None if value is None else int(value)


class SamProposer(ModelProposer):
    """Candidate masks from SAM's automatic mask generator (segment-anything's defaults).

    Args:
        model_dir: local folder with the files of `facebook/sam-vit-huge` (HybridGL's), `-large` or
            `-base` (or a SAM 2 repo such as `facebook/sam2.1-hiera-large`): `config.json`, weights,
            and the processor config. Loaded with `local_files_only=True`.
        cache_dir: if given, every image's proposals are stored there (`copatch.proposal_cache`,
            the stored-proposal format) and found again on a later run instead of running SAM.
            Written by a background thread (atomic; flushed at the end of a predict run,
            `copatch.proposal_cache.flush_writes`).
        points_per_side: the prompt grid is `points_per_side**2` points (SAM: 32; HybridGL: 8).
        points_per_batch: prompts per mask-decoder call (memory only; the masks do not depend on it).
        pred_iou_thresh: keep masks whose predicted IoU is `>` this (None: SAM's 0.88, SAM 2's 0.8;
            0 turns it off).
        stability_score_thresh: keep masks whose stability score is `>=` this (0.95; 0: off).
        stability_score_offset: logit offset of the stability score (1.0).
        box_nms_thresh: IoU of boxes above which box NMS drops the lower-IoU mask (0.7).
        min_mask_region_area: fill holes and remove islands smaller than this many pixels (at the
            original resolution), then NMS again (SAM's default 0: off; HybridGL uses 800).
        mask_threshold: logit threshold of a mask pixel (SAM: 0.0).
        config: a `transformers.SamConfig` (or `Sam2Config`) for a random model instead of `model_dir`
            (tests), with `processor` (default: a `SamProcessor` whose sizes follow the config).
        dtype: autocast dtype of the SAM forward ("bfloat16" on GPU is about twice as fast and
            changes masks a little); None runs the model's float32 with any outer autocast off.
            Post-processing is float32 either way.
        scores: return each mask's predicted IoU as its score.

    Calling it on an `ImageSample` returns `Proposals(masks=[N, H, W] bool, scores=[N] | None)` at
    the original `(H, W)` on the image's device; `propose_batch` encodes several images in one
    forward. The module stays in eval mode with gradients off and moves with its host (`.to`).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        points_per_side: int = POINTS_PER_SIDE,
        points_per_batch: int = POINTS_PER_BATCH,
        pred_iou_thresh: float | None = None,
        stability_score_thresh: float = STABILITY_SCORE_THRESH,
        stability_score_offset: float = STABILITY_SCORE_OFFSET,
        box_nms_thresh: float = BOX_NMS_THRESH,
        min_mask_region_area: int = 0,
        mask_threshold: float = MASK_THRESHOLD,
        *,
        config: SamConfig | None = None,
        processor: SamProcessor | None = None,
        dtype: str | None = None,
        scores: bool = True,
    ) -> None:
        super().__init__()
        if (model_dir is None) == (config is None):
            raise UserValueError(
                "give exactly one of `model_dir` (a local folder with the files of facebook/sam-vit-*) "
                "and `config` (a transformers.SamConfig for a random-weight model)"
            )
        for name, value in (("points_per_side", points_per_side), ("points_per_batch", points_per_batch)):
            if int(value) < 1:
                raise UserValueError(f"{name}={value} must be >= 1")
        if min_mask_region_area < 0 or not 0.0 <= box_nms_thresh <= 1.0 or stability_score_offset < 0:
            raise UserValueError(
                f"need min_mask_region_area >= 0, 0 <= box_nms_thresh <= 1 and stability_score_offset"
                f" >= 0, got {min_mask_region_area}, {box_nms_thresh}, {stability_score_offset}"
            )
        self.forward_dtype = _parse_dtype(dtype)  # before the (slow) load: fail fast
        self.model_dir = None if model_dir is None else check_model_dir(model_dir)
        transformers = _import_transformers()
        if self.model_dir is not None:
            self.model, processor = self._load(transformers, self.model_dir)
        elif config.model_type == "sam2":
            self.model = transformers.Sam2Model(config)
            if processor is None:
                size = int(config.prompt_encoder_config.image_size)
                processor = transformers.Sam2Processor(image_processor=transformers.Sam2ImageProcessor(
                    size={"height": size, "width": size}))
        else:
            self.model = transformers.SamModel(config)
            if processor is None:
                size = int(config.vision_config.image_size)
                processor = transformers.SamProcessor(image_processor=transformers.SamImageProcessor(
                    size={"longest_edge": size}, pad_size={"height": size, "width": size}))
        # SAM 2 (Hiera + FPN, square 1024 input) or SAM 1 (ViT, long side 1024 + padding).
        self.sam2 = self.model.config.model_type == "sam2"
        if self.sam2 and min_mask_region_area > 0:
            raise UserValueError(
                "min_mask_region_area > 0 is not supported with SAM 2 (sam2 also fills holes in the "
                "low-res logits, which is not implemented here); use 0 or a SAM 1 model")
        if pred_iou_thresh is None:
            pred_iou_thresh = PRED_IOU_THRESH_SAM2 if self.sam2 else PRED_IOU_THRESH
        self.model.float()
        self.model.eval()
        self.model.requires_grad_(False)
        self._read_processor(processor)

        self.points_per_side = int(points_per_side)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.min_mask_region_area = int(min_mask_region_area)
        self.mask_threshold = float(mask_threshold)
        self.return_scores = bool(scores)
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self._cache: Any = None
        self.train(False)

    @classmethod
    def from_config(cls, config: SamConfig, **kwargs: Any) -> SamProposer:
        """A proposer around a randomly initialised model of `config` (no files read)."""
        return cls(config=config, **kwargs)

    @staticmethod
    def _load(transformers: Any, path: Path) -> tuple[nn.Module, Any]:
        try:
            model_type = json.loads((path / _CONFIG_FILE).read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError) as err:
            raise UserValueError(f"cannot read {path / _CONFIG_FILE}: {err}") from err
        if model_type not in ("sam", "sam2"):
            raise UserValueError(
                f"{path / _CONFIG_FILE} describes a {model_type!r} model, not 'sam' (facebook/sam-vit-huge,"
                f" -large, -base) or 'sam2' (facebook/sam2.1-hiera-*). {_fetch_hint(path)}"
            )
        model_cls, processor_cls = ((transformers.Sam2Model, transformers.Sam2Processor) if model_type == "sam2"
                                    else (transformers.SamModel, transformers.SamProcessor))
        model = model_cls.from_pretrained(str(path), local_files_only=True)
        processor = processor_cls.from_pretrained(str(path), local_files_only=True)
        return model, processor

    def _read_processor(self, processor: Any) -> None:
        """Take the resize / pad / normalisation settings from the processor (its config file)."""
        ip = getattr(processor, "image_processor", processor)
        encoder_size = int(self.model.config.prompt_encoder_config.image_size)
        if self.sam2:  # a square resize, no padding
            height, width = _size_value(ip.size, "height"), _size_value(ip.size, "width")
            if (height, width) != (encoder_size, encoder_size):
                raise UserValueError(
                    f"SAM 2 processor size {height}x{width} does not fit the model's {encoder_size} x "
                    f"{encoder_size} input; use the processor config of the same repo")
            longest = encoder_size
        else:
            longest = _size_value(ip.size, "longest_edge")
            pad_h, pad_w = _size_value(ip.pad_size, "height"), _size_value(ip.pad_size, "width")
            if longest is None or (pad_h, pad_w) != (encoder_size, encoder_size) or longest > encoder_size:
                raise UserValueError(
                    f"SAM processor sizes (longest_edge={longest}, pad_size={pad_h}x{pad_w}) do not fit the "
                    f"model's {encoder_size} x {encoder_size} input; use the processor config of the same repo"
                )
        scale = 1.0 / float(ip.rescale_factor) if ip.do_rescale else 1.0  # to 0..255 units
        mean = torch.tensor(ip.image_mean if ip.do_normalize else (0.0, 0.0, 0.0), dtype=torch.float64)
        std = torch.tensor(ip.image_std if ip.do_normalize else (1.0, 1.0, 1.0), dtype=torch.float64)
        self.longest_side = longest
        self.input_size = encoder_size
        # Non-persistent buffers: they follow `.to(device)` but stay out of checkpoints.
        self.register_buffer("pixel_mean", (mean * scale).float().view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", (std * scale).float().view(3, 1, 1), persistent=False)

    # ------------------------------------------------------------------------------ properties
    def extra_repr(self) -> str:
        return (
            f"model_dir={str(self.model_dir) if self.model_dir else None!r}, "
            f"points_per_side={self.points_per_side}, pred_iou_thresh={self.pred_iou_thresh}, "
            f"stability_score_thresh={self.stability_score_thresh}, box_nms_thresh={self.box_nms_thresh}, "
            f"min_mask_region_area={self.min_mask_region_area}, "
            f"cache_dir={str(self.cache_dir) if self.cache_dir else None!r}, dtype={self.forward_dtype}"
        )

    def settings(self) -> dict[str, Any]:
        """What determines the masks; the cache refuses entries made with other settings."""
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "generator": "sam2_automatic_mask_generator" if self.sam2 else "sam_automatic_mask_generator",
            "model": str(self.model_dir.name) if self.model_dir is not None else "random-config",
            "parameters": n_params,
            "longest_side": self.longest_side,
            "points_per_side": self.points_per_side,
            "pred_iou_thresh": self.pred_iou_thresh,
            "stability_score_thresh": self.stability_score_thresh,
            "stability_score_offset": self.stability_score_offset,
            "box_nms_thresh": self.box_nms_thresh,
            "min_mask_region_area": self.min_mask_region_area,
            "mask_threshold": self.mask_threshold,
            "dtype": str(self.forward_dtype or torch.float32).removeprefix("torch."),
        }

    # ---------------------------------------------------------------------------------- public
    def input_step(self) -> SamInput | None:
        """The resize this proposer needs, as a step `copatch.prepare.SamplePreparer` runs in workers."""
        return None if self.sam2 else SamInput(self.longest_side)

    # ------------------------------------------------------------------------------- internals
    def _proposal_cache(self) -> Any:
        if self.cache_dir is None:
            return None
        if self._cache is None:
            from copatch.proposal_cache import ProposalCache

            self._cache = ProposalCache(self.cache_dir, self.settings(), background=True)
        return self._cache

    def preprocess(
        self, images: Sequence[Tensor], resized: Sequence[Tensor | None] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        """`pixel_values [B, 3, S, S]` float32 on the module's device (`S` the encoder's input size)
        and each image's resized `(h, w)` (its valid top-left region)."""
        s = self.input_size
        batch = torch.zeros(len(images), 3, s, s, device=self.device)
        sizes = []
        if self.sam2:
            for b, image in enumerate(images):
                # sam2's `SAM2Transforms`: torchvision `Resize((S, S))` of the [0, 1] float image,
                # bilinear with antialias, aspect ratio not kept; (x / 255 - mean) / std is the same
                # as (x - 255 mean) / (255 std).
                pixels = image.to(self.device, torch.float32)[None]
                pixels = F.interpolate(pixels, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
                batch[b] = (pixels[0] - self.pixel_mean) / self.pixel_std
                sizes.append((s, s))
            return batch, sizes
        for b, image in enumerate(images):
            size = longest_side_size(*image.shape[-2:], self.longest_side)
            ready = resized[b] if resized is not None else None
            pixels = ready if ready is not None and tuple(ready.shape[-2:]) == size else resize_uint8(image, size)
            pixels = pixels.to(self.device, torch.float32)
            # Zero padding *after* normalisation, as segment-anything's `Sam.preprocess`.
            batch[b, :, :size[0], :size[1]] = (pixels - self.pixel_mean) / self.pixel_std
            sizes.append(size)
        return batch, sizes

    def prompt_points(self, original_size: tuple[int, int], resized_size: tuple[int, int]) -> Tensor:
        """`[n*n, 2]` float32 grid points `(x, y)` in the resized image's pixel frame.

        As SAM: the unit grid is scaled to the original `(W, H)`, then by `(w / W, h / H)`
        (`ResizeLongestSide.apply_coords`), in float64.
        """
        (hh, ww), (h, w) = original_size, resized_size
        grid = point_grid(self.points_per_side) * torch.tensor([ww, hh], dtype=torch.float64)
        if self.sam2:  # sam2's `transform_coords(normalize=True)`: divide by (W, H), times S
            return (grid / torch.tensor([ww, hh], dtype=torch.float64) * self.input_size).float()
        grid = grid * torch.tensor([w / ww, h / hh], dtype=torch.float64)
        return grid.float()

    def decode(self, embedding: Tensor | list[Tensor], points: Tensor) -> tuple[Tensor, Tensor]:
        """Prompt encoder + mask decoder for one image.

        Args:
            embedding: `[1, C, E, E]` the image's embedding (SAM 2: the list of its FPN levels).
            points: `[P, 2]` `(x, y)` in the resized frame, one positive point per prompt.

        Returns:
            low-res mask logits `[P, 3, 4E, 4E]` and predicted IoUs `[P, 3]`, float32.
        """
        device = embedding[0].device if isinstance(embedding, list) else embedding.device
        pts = points.to(device)[None, :, None, :]  # [1, P, 1, 2]
        labels = torch.ones(pts.shape[:3], dtype=torch.long, device=device)
        with self._autocast():
            out = self.model(image_embeddings=embedding, input_points=pts, input_labels=labels,
                             multimask_output=True)
        return out.pred_masks[0].float(), out.iou_scores[0].float()

    def upscale(self, logits: Tensor, resized_size: tuple[int, int], original_size: tuple[int, int]) -> Tensor:
        """`[M, 4E, 4E]` low-res logits -> `[M, H, W]` float32: bilinear to the padded input, crop the
        resized image's region, bilinear to the original size (SAM's `postprocess_masks`; SAM 2:
        straight to the original size)."""
        if self.sam2:  # sam2's `postprocess_masks`: straight to the original size
            return F.interpolate(logits[:, None].float(), size=original_size, mode="bilinear",
                                 align_corners=False)[:, 0]
        s = self.input_size
        up = F.interpolate(logits[:, None].float(), size=(s, s), mode="bilinear", align_corners=False)
        up = up[..., :resized_size[0], :resized_size[1]]
        return F.interpolate(up, size=original_size, mode="bilinear", align_corners=False)[:, 0]

    def _filter_batch(self, low_res: Tensor, iou: Tensor, resized_size: tuple[int, int],
                      original_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """One decoder batch `[P, 3, r, r]`, `[P, 3]` -> kept masks `[M, H, W] bool` and IoUs `[M]`."""
        low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)  # point-major, as SAM's flatten
        if self.pred_iou_thresh > 0.0:
            keep = iou > self.pred_iou_thresh
            low_res, iou = low_res[keep], iou[keep]
        h, w = original_size
        if low_res.shape[0] == 0:
            return low_res.new_zeros((0, h, w), dtype=torch.bool), iou
        chunk = max(1, _UPSAMPLE_BUDGET // (self.input_size**2 + h * w * 2))
        masks, ious = [], []
        for part, part_iou in zip(low_res.split(chunk), iou.split(chunk)):
            logits = self.upscale(part, resized_size, original_size)
            if self.stability_score_thresh > 0.0:
                stable = stability_scores(logits, self.mask_threshold, self.stability_score_offset)
                keep = stable >= self.stability_score_thresh
                logits, part_iou = logits[keep], part_iou[keep]
            masks.append(logits > self.mask_threshold)
            ious.append(part_iou)
        return torch.cat(masks), torch.cat(ious)

    def generate(self, embedding: Tensor | list[Tensor], original_size: tuple[int, int],
                 resized_size: tuple[int, int]) -> Proposals:
        """SAM's automatic mask generation for one image from its `[1, C, E, E]` embedding."""
        points = self.prompt_points(original_size, resized_size)
        masks, ious = [], []
        for batch in points.split(self.points_per_batch):
            low_res, iou = self.decode(embedding, batch)
            m, s = self._filter_batch(low_res, iou, resized_size, original_size)
            masks.append(m)
            ious.append(s)
        masks_t, ious_t = torch.cat(masks), torch.cat(ious)
        boxes = masks_to_boxes(masks_t)
        keep = batched_nms(boxes, ious_t, torch.zeros_like(ious_t, dtype=torch.int64), self.box_nms_thresh)
        masks_t, ious_t = masks_t[keep], ious_t[keep]
        if self.min_mask_region_area > 0 and len(masks_t) > 0:
            masks_t, ious_t = self.remove_small_regions(masks_t, ious_t)
        return Proposals(masks=masks_t, scores=ious_t if self.return_scores else None)

    def remove_small_regions(self, masks: Tensor, ious: Tensor) -> tuple[Tensor, Tensor]:
        """SAM's `postprocess_small_regions`: fill small holes, drop small islands, then box NMS
        preferring the masks that did not change. `[N, H, W] bool`, `[N]` -> `[M, H, W]`, `[M]`."""
        new_masks, unchanged = [], []
        for mask in masks:
            mask, holes = remove_small_regions(mask, self.min_mask_region_area, "holes")
            mask, islands = remove_small_regions(mask, self.min_mask_region_area, "islands")
            new_masks.append(mask)
            unchanged.append(0.0 if holes or islands else 1.0)
        stacked = torch.stack(new_masks)
        scores = torch.tensor(unchanged, device=masks.device)
        keep = batched_nms(masks_to_boxes(stacked), scores, torch.zeros_like(scores, dtype=torch.int64),
                           self.box_nms_thresh)
        return stacked[keep], ious[keep]

    def _run(self, images: list[Tensor], resized: list[Tensor | None]) -> list[Proposals]:
        with torch.inference_mode():
            pixel_values, sizes = self.preprocess(images, resized)
            with self._autocast():
                embeddings = self.model.get_image_embeddings(pixel_values)
            out = [
                self.generate([e[b:b + 1] for e in embeddings] if self.sam2 else embeddings[b:b + 1],
                              tuple(image.shape[-2:]), sizes[b])
                for b, image in enumerate(images)
            ]
        # Clone outside inference mode: inference tensors cannot be changed in place later.
        return [Proposals(masks=p.masks.clone(), scores=None if p.scores is None else p.scores.clone())
                for p in out]

