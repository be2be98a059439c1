"""Mask2Former candidate masks, reproducing the reference's detectron2 pipeline (method-notes a.2).

The reference (IteRPrimE's patched detectron2 Mask2Former, Swin-L IN21k-384, COCO panoptic, 200
queries) turns every image into *all* of its query masks. This module does the same with the
Hugging Face port of that checkpoint (`transformers.Mask2FormerForUniversalSegmentation`),
loaded from a local folder; nothing is downloaded.

Pipeline for an image `[3, H, W] uint8` RGB (one `Proposals` per image):

1. Resize so the short side is 800 and the long side at most 1333 (detectron2's
   `ResizeShortestEdge(800, 1333)` of `DefaultPredictor`), bilinear with PIL on the uint8 image,
   exactly as detectron2's `ResizeTransform` does -> `[3, h, w]`.
2. `(x - mean) / std` with ImageNet mean/std in 0..255 units, then zero-pad to a common
   `[3, Hp, Wp]`, `Hp, Wp` multiples of 32 (detectron2's `ImageList.from_tensors`).
3. Model -> `masks_queries_logits` `[B, Q, Hp/4, Wp/4]` (and `class_queries_logits`
   `[B, Q, C+1]`).
4. Per image, in float32: bilinear upsample to `[Q, Hp, Wp]`, crop to `[Q, h, w]`, bilinear
   resize to `[Q, H, W]` (detectron2's `sem_seg_postprocess`), then `sigmoid > 0.35`.

Result: `Proposals(masks=[Q, H, W] bool, scores=[Q] float32 or None)`, all `Q` queries in query
order. There is no class/score filtering and no NMS; empty masks and near-duplicates are kept,
because the selection stage indexes into this list, as the reference's does.

`transformers` is an optional dependency (`pip install "copatch[mask2former]"`); importing this
module does not need it, building a proposer does.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F

from copatch.errors import UserFileNotFound, UserValueError, knob
from copatch.proposal_cache import ProposalCache
from copatch.model_proposer import ModelProposer
from copatch.proposals import Proposals
from copatch.types import ImageSample

if TYPE_CHECKING:  # pragma: no cover
    from transformers import Mask2FormerConfig

REFERENCE_CHECKPOINT = "facebook/mask2former-swin-large-coco-panoptic"
# The reference model has 200 object queries; the selection indexes into the 200 masks.
REFERENCE_NUM_QUERIES = 200
# detectron2's default test-time resize (the reference config does not override it).
MIN_SIZE_TEST = 800
MAX_SIZE_TEST = 1333
# detectron2 / Mask2Former normalisation: ImageNet statistics in 0..255 units, RGB order.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# Swin's total stride: Mask2Former pads the batch to a multiple of this.
SIZE_DIVISIBILITY = 32
# IteRPrimE binarises `sigmoid(logits) > 0.35` (not the usual 0.5): larger, more inclusive masks.
MASK_THRESHOLD = 0.35

# Files that make a usable model folder (what `save_pretrained` / the hub repo hold).
_CONFIG_FILE = "config.json"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Float32 elements of one upsampled logit chunk (~256 MiB): bounds post-processing memory.
_UPSAMPLE_BUDGET = 2**26

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "Mask2FormerProposer needs the Hugging Face `transformers` package, which is not "
            f"installed ({err}). Install it with: pip install \"copatch[mask2former]\""
        ) from err
    return transformers


def _fetch_advice(path: Path) -> str:
    """What to put in the model folder `path`, and the command that fetches it."""
    from copatch.downloads import fetch_hint  # the one table of what to fetch and how

    return (
        f"Put the files of the Hugging Face repo {REFERENCE_CHECKPOINT} in {path} ({_CONFIG_FILE} "
        "and model.safetensors, or pytorch_model.bin). "
        + fetch_hint("mask2former", destination=str(path))
    )


def _missing_model_message(path: Path, problem: str) -> str:
    return f"Mask2Former model folder {path}: {problem}. " + _fetch_advice(path)


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """The folder as a `Path` if it holds `config.json` and weights, else `UserFileNotFound`.

    A `model.safetensors` there is checked for truncation too (`check_safetensors`, cheap: it reads
    the header only), so that a partly fetched file is named before the slow load.
    """
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "does not exist"
        raise UserFileNotFound(_missing_model_message(path, problem))
    if not (path / _CONFIG_FILE).is_file():
        raise UserFileNotFound(_missing_model_message(path, f"has no {_CONFIG_FILE}"))
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise UserFileNotFound(
            _missing_model_message(path, f"has no weights (none of {', '.join(_WEIGHT_FILES)})")
        )
    if (path / "model.safetensors").is_file():
        check_safetensors(path / "model.safetensors")
    return path


def _corrupt_weights_message(file: Path, problem: str, maybe_other: bool = False) -> str:
    from copatch.downloads import fetch_hint

    other = ", or does not belong to the config.json beside it" if maybe_other else ""
    return (
        f"Mask2Former weights {file} are unreadable ({problem}): the file is truncated or corrupt "
        f"(an interrupted download or copy){other}; delete it and fetch it again. "
        + fetch_hint("mask2former", destination=str(file.parent))
    )


def check_safetensors(file: Path) -> None:
    """Refuse a `.safetensors` file whose header is unreadable or whose size is not what it says.

    The format is an 8-byte little-endian header length, a JSON header giving every tensor's
    `data_offsets`, then the data; a complete file is exactly `8 + header + max(end offset)` bytes.
    Raises `UserValueError` naming the file and the fix.
    """
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserValueError(_corrupt_weights_message(
                    file, f"{size} bytes, less than the 8-byte header length"))
            header_len = int.from_bytes(head, "little")
            if 8 + header_len > size:
                raise UserValueError(_corrupt_weights_message(
                    file, f"its header alone should be {header_len} bytes, the file has {size}"))
            header = json.loads(f.read(header_len))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except UserValueError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError) as err:
        raise UserValueError(_corrupt_weights_message(file, f"bad header: {err}")) from err
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        raise UserValueError(_corrupt_weights_message(
            file, f"it has {size} bytes where its header says {expected}"
        ))


def resize_shortest_edge_size(
    height: int, width: int, short_edge: int = MIN_SIZE_TEST, max_size: int = MAX_SIZE_TEST
) -> tuple[int, int]:
    """detectron2's `ResizeShortestEdge` output size `(new_h, new_w)` for an `(H, W)` image.

    The short side goes to `short_edge`; if the long side would then exceed `max_size`, both are
    scaled down so that it equals `max_size`; each side is rounded half up. Same float operations
    in the same order as detectron2, so the sizes (and the masks) agree to the pixel.
    """
    scale = short_edge * 1.0 / min(height, width)
    if height < width:
        new_h, new_w = float(short_edge), scale * width
    else:
        new_h, new_w = scale * height, float(short_edge)
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_uint8(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of a `[3, H, W] uint8` image to `[3, h, w] uint8` (CPU), as detectron2.

    detectron2's `ResizeTransform` resizes uint8 images with PIL `BILINEAR`, which antialiases when
    shrinking and rounds back to uint8; going through PIL here gives the same pixels, whereas
    `torch` bilinear (even with `antialias=True`) differs by a grey level here and there.
    """
    h, w = size
    if (h, w) == tuple(image.shape[-2:]):
        return image.cpu()  # PIL returns an identical copy for a same-size resize
    array = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    resized = Image.fromarray(array).resize((w, h), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous()



@dataclass(frozen=True)
class Mask2FormerInput:
    """The detectron2 test-time resize as a `copatch.prepare.PrepareStep` (runs in DataLoader workers).

    The key holds the output size, which depends on the image size and the resize settings.
    """

    min_size: int = MIN_SIZE_TEST
    max_size: int = MAX_SIZE_TEST

    def key(self, size: tuple[int, int]) -> str:
        h, w = resize_shortest_edge_size(*size, self.min_size, self.max_size)
        return f"mask2former:{h}x{w}"

    def __call__(self, sample: ImageSample) -> Tensor:
        """The sample's `image` `[3, H, W] uint8` -> `[3, h, w] uint8` on the CPU."""
        image = sample.image
        return resize_uint8(image, resize_shortest_edge_size(*image.shape[-2:], self.min_size, self.max_size))

def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise UserValueError(
            f"{knob('proposer.init_args.dtype')} {dtype!r} is not one of {sorted(set(_DTYPES))} "
            "(or null)"
        )
    return _DTYPES[key]


class Mask2FormerProposer(ModelProposer):
    """All query masks of a Mask2Former as proposals, as the reference makes them.

    Args:
        model_dir: local folder with the Hugging Face checkpoint (`config.json` + weights), the
            reference being `facebook/mask2former-swin-large-coco-panoptic` (200 queries). Loaded
            with `local_files_only=True`.
        cache_dir: if given, proposals are cached there (`copatch.proposal_cache.ProposalCache`:
            `<cache_dir>/<settings digest>/<image_id>.json`, stored-proposal format) and a later
            call for the same image (same id *and* same pixels) with the same settings loads them
            instead of running the model. An entry of another image with that id (datasets whose
            ids collide) is not used: recomputed and overwritten, with a warning. A cache_dir of
            the old layout (no content hash) is refused. Entries are written by a background thread
            (atomic; flushed at the end of a predict run, `copatch.proposal_cache.flush_writes`).
        threshold: a pixel is in a mask when `sigmoid(logit) > threshold` (reference: 0.35).
        config: a `transformers.Mask2FormerConfig` to build a randomly initialised model instead
            of loading `model_dir` (tests); exactly one of `model_dir` / `config`.
        dtype: autocast dtype of the model forward ("bfloat16" is a good choice on GPU); None runs
            it in the model's own dtype (float32: the reference) with any outer autocast disabled.
            Mask post-processing is always float32. A `torch.dtype` is accepted too.
        scores: also return per-query scores (max softmax class probability, no-object excluded).
            They are informational only; nothing is filtered by them.
        min_size, max_size: test-time resize (detectron2 `ResizeShortestEdge`, 800 / 1333).
        size_divisibility: pad the batch to a multiple of this (32).
        batching: how `propose_batch` batches images. "same_size" (default) runs the images whose
            padded model input has the same size together, so that no image sees more padding
            than it would alone: the masks are those of one image at a time (the reference's
            `DefaultPredictor`), up to float rounding. "largest" pads every image of the call to the
            largest, as detectron2 batches: one forward, but the Swin windows and the pixel decoder
            then see extra padding and the masks of the smaller images change slightly.

    Calling it on an `ImageSample` returns `Proposals(masks=[Q, H, W] bool, scores=[Q] | None)`
    at the image's original `(H, W)`, on the image's device; `propose_batch` does several images
    in one forward. The module stays in eval mode with gradients off; as a submodule of the
    `CoPatch` LightningModule it moves with it (`.to(device)`).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        threshold: float = MASK_THRESHOLD,
        *,
        config: Mask2FormerConfig | None = None,
        dtype: str | None = None,
        scores: bool = True,
        min_size: int = MIN_SIZE_TEST,
        max_size: int = MAX_SIZE_TEST,
        size_divisibility: int = SIZE_DIVISIBILITY,
        batching: Literal["same_size", "largest"] = "same_size",
    ) -> None:
        super().__init__()
        if (model_dir is None) == (config is None):
            raise ValueError(
                "give exactly one of `model_dir` (a local Hugging Face Mask2Former folder) and "
                "`config` (a transformers.Mask2FormerConfig for a random-weight model)"
            )
        if not 0.0 <= threshold < 1.0:
            raise UserValueError(
                f"{knob('proposer.init_args.threshold')} {threshold} is not in [0, 1): it is a "
                "sigmoid probability (reference: 0.35)"
            )
        if min_size <= 0 or max_size < min_size or size_divisibility < 1:
            raise UserValueError(
                f"need 0 < min_size <= max_size and size_divisibility >= 1, got min_size={min_size}"
                f", max_size={max_size}, size_divisibility={size_divisibility}"
            )
        if batching not in ("same_size", "largest"):
            raise UserValueError(
                f"{knob('proposer.init_args.batching')} must be 'same_size' or 'largest', got "
                f"{batching!r}"
            )
        self.forward_dtype = _parse_dtype(dtype)  # before the (slow) load: fail fast
        self.model_dir = None if model_dir is None else check_model_dir(model_dir)
        transformers = _import_transformers()
        if self.model_dir is not None:
            self.model = self._load(transformers, self.model_dir)
        else:
            self.model = transformers.Mask2FormerForUniversalSegmentation(config)
        self.model.float()  # loads may keep a checkpoint's storage dtype; the reference is fp32
        self.model.eval()
        self.model.requires_grad_(False)

        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self.threshold = float(threshold)
        self.return_scores = bool(scores)
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.size_divisibility = int(size_divisibility)
        self.batching = batching
        # Keyed by settings, image id and image content (copatch.proposal_cache); refuses a cache_dir
        # of the old layout (entries without a content hash) here, at construction.
        self.cache = None if self.cache_dir is None else ProposalCache(self.cache_dir, self.settings(), background=True)
        # Non-persistent buffers: they follow `.to(device)` but stay out of checkpoints.
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(3, 1, 1), persistent=False)
        self.train(False)

    @classmethod
    def from_config(cls, config: Mask2FormerConfig, **kwargs: Any) -> Mask2FormerProposer:
        """A proposer around a randomly initialised model of `config` (no files read)."""
        return cls(config=config, **kwargs)

    @staticmethod
    def _load(transformers: Any, path: Path) -> nn.Module:
        try:
            model_type = json.loads((path / _CONFIG_FILE).read_text(encoding="utf-8")).get(
                "model_type"
            )
        except (OSError, ValueError, AttributeError) as err:
            raise UserValueError(
                f"cannot read {path / _CONFIG_FILE}: {err}. "
                + _fetch_advice(path)
            ) from err
        if model_type != "mask2former":
            raise UserValueError(
                f"{path / _CONFIG_FILE} describes a {model_type!r} model, not 'mask2former': "
                + _missing_model_message(path, "holds another model")
            )
        try:
            model = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(
                str(path), local_files_only=True
            )
        except Exception as err:  # safetensors / torch / transformers each raise their own types
            # A weights file that passed `check_model_dir` but still cannot be read: name it (the
            # libraries' messages, e.g. "Error while deserializing header", do not).
            weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), path)
            # First line only: torch's unpickling errors run to a dozen lines of advice.
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise UserValueError(
                _corrupt_weights_message(weights, f"{type(err).__name__}: {first}", maybe_other=True)
            ) from err
        if model.config.num_queries != REFERENCE_NUM_QUERIES:
            warnings.warn(
                f"the Mask2Former in {path} has {model.config.num_queries} queries; the reference "
                f"({REFERENCE_CHECKPOINT}) has {REFERENCE_NUM_QUERIES}, so the proposals (and the "
                "results) will differ from the paper's",
                stacklevel=3,
            )
        return model

    # ------------------------------------------------------------------------------ properties
    @property
    def num_queries(self) -> int:
        """`Q`: the number of masks per image."""
        return int(self.model.config.num_queries)

    def extra_repr(self) -> str:
        return (
            f"model_dir={str(self.model_dir) if self.model_dir else None!r}, "
            f"num_queries={self.num_queries}, threshold={self.threshold}, "
            f"cache_dir={str(self.cache_dir) if self.cache_dir else None!r}, "
            f"dtype={self.forward_dtype}"
        )

    # ---------------------------------------------------------------------------------- public
    def input_step(self) -> Mask2FormerInput:
        """The resize this proposer needs, as a step `copatch.prepare.SamplePreparer` can run in workers."""
        return Mask2FormerInput(self.min_size, self.max_size)

    def _proposal_cache(self) -> ProposalCache | None:
        return self.cache

    def padded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The model input size `(Hp, Wp)` of an `(H, W)` image run alone (resize, then pad)."""
        h, w = resize_shortest_edge_size(*size, self.min_size, self.max_size)
        d = self.size_divisibility
        return -(-h // d) * d, -(-w // d) * d

    def _groups(self, images: Sequence[Tensor], todo: list[int]) -> list[list[int]]:
        """The batches of `todo` (indices into `images`) that go through the model together."""
        if not todo or self.batching == "largest":
            return [todo] if todo else []
        groups: dict[tuple[int, int], list[int]] = {}
        for i in todo:
            groups.setdefault(self.padded_size(tuple(images[i].shape[-2:])), []).append(i)
        return list(groups.values())

    # ------------------------------------------------------------------------------- internals
    def preprocess(
        self, images: Sequence[Tensor], resized: Sequence[Tensor | None] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        """Resized, normalised, zero-padded batch on the module's device.

        Args:
            images: `[3, H, W] uint8` each.
            resized: per image, its `[3, h, w] uint8` resize if already made (a worker), else None.

        Returns:
            `pixel_values [B, 3, Hp, Wp]` float32 (`Hp, Wp` multiples of `size_divisibility`)
            and the resized `(h, w)` of each image (its valid top-left region).
        """
        normed, sizes = [], []
        for i, image in enumerate(images):
            size = resize_shortest_edge_size(*image.shape[-2:], self.min_size, self.max_size)
            ready = resized[i] if resized is not None else None
            pixels = ready if ready is not None else resize_uint8(image, size)
            pixels = pixels.to(self.device, torch.float32)
            normed.append((pixels - self.pixel_mean) / self.pixel_std)
            sizes.append(size)
        d = self.size_divisibility
        hp = -(-max(h for h, _ in sizes) // d) * d
        wp = -(-max(w for _, w in sizes) // d) * d
        # Padding is 0 *after* normalisation (the mean colour), as ImageList.from_tensors does.
        batch = normed[0].new_zeros(len(normed), 3, hp, wp)
        for b, (x, (h, w)) in enumerate(zip(normed, sizes)):
            batch[b, :, :h, :w] = x
        return batch, sizes

    def postprocess(
        self, mask_logits: Tensor, padded_size: tuple[int, int], resized_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> Tensor:
        """One image's `[Q, Hp/4, Wp/4]` mask logits -> `[Q, H, W]` bool, in float32.

        Upsample to the padded input, crop the image's valid region, resize to the original size,
        then threshold the sigmoid. Queries are processed in chunks to bound memory; bilinear
        interpolation treats channels independently, so chunking does not change any value.
        """
        logits = mask_logits.float()
        hp, wp = padded_size
        h, w = resized_size
        per_query = hp * wp + h * w + original_size[0] * original_size[1]
        chunk = max(1, _UPSAMPLE_BUDGET // per_query)
        out = []
        for part in logits.split(chunk, dim=0):
            # Order as the reference: upsample the padded 1/4 map first, crop after. Cropping the
            # low-res logits first and resizing would shift the masks by a fraction of a pixel.
            up = F.interpolate(part[None], size=(hp, wp), mode="bilinear", align_corners=False)
            up = up[:, :, :h, :w]
            up = F.interpolate(up, size=original_size, mode="bilinear", align_corners=False)[0]
            out.append(up.sigmoid() > self.threshold)
        return torch.cat(out, dim=0)

    def _run(self, images: list[Tensor], resized: list[Tensor | None]) -> list[Proposals]:
        with torch.inference_mode():
            pixel_values, sizes = self.preprocess(images, resized)
            param_dtype = next(self.model.parameters()).dtype
            with self._autocast():
                outputs = self.model(pixel_values=pixel_values.to(param_dtype))
            mask_logits = outputs.masks_queries_logits  # [B, Q, Hp/4, Wp/4]
            class_logits = outputs.class_queries_logits  # [B, Q, C + 1], last = no object
            padded = tuple(pixel_values.shape[-2:])
            masks, scores = [], []
            for b, image in enumerate(images):
                masks.append(self.postprocess(mask_logits[b], padded, sizes[b],
                                              tuple(image.shape[-2:])))
                if self.return_scores:
                    probs = class_logits[b].float().softmax(dim=-1)[:, :-1]
                    scores.append(probs.max(dim=-1).values)
        # Clone outside inference mode: inference tensors cannot be modified in place or saved
        # for autograd later, which would surprise callers; cached loads are normal tensors too.
        return [
            Proposals(masks=m.clone(), scores=s.clone() if self.return_scores else None)
            for m, s in zip(masks, scores if self.return_scores else [None] * len(masks))
        ]

    def settings(self) -> dict[str, Any]:
        """What determines the masks besides the image: the cache's key (`copatch.proposal_cache`).

        The model enters through its architecture (queries, classes, backbone), not its weights:
        two checkpoints of one architecture need two `cache_dir`s.
        """
        config = self.model.config
        backbone = getattr(config, "backbone_config", None)
        return {
            "generator": "mask2former",
            "num_queries": self.num_queries,
            "num_labels": int(getattr(config, "num_labels", 0)),
            "backbone": None if backbone is None else {
                "model_type": getattr(backbone, "model_type", None),
                "embed_dim": getattr(backbone, "embed_dim", None),
                "depths": list(getattr(backbone, "depths", []) or []),
            },
            "threshold": self.threshold,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "size_divisibility": self.size_divisibility,
            "batching": self.batching,
            "dtype": str(self.forward_dtype or torch.float32).removeprefix("torch."),
        }
