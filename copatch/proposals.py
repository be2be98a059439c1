"""Candidate masks ("proposals") per image, and the stored-proposal format.

A proposer maps an `ImageSample` to `Proposals`: `[N, H, W]` bool masks at the image's original
resolution, plus optional `[N]` scores. Like the reference (Mask2Former, all 200 query masks), no
filtering happens here: empty masks and near-duplicates are kept, in the generator's order, since
the selection indexes into this list.

Stored-proposal format (`StoredProposals`): one UTF-8 JSON file per image,
`<root>/<image_id>.json`::

    {
      "image_id": 139,                 # the dataset's image id (int or str), as in the file name
      "height": 426, "width": 640,     # the ORIGINAL image size (H, W)
      "masks": [                       # N >= 0 masks, in proposal order
        {"size": [426, 640], "counts": "Yc`0a0..."},
        ...
      ],
      "scores": [0.93, ...] or null    # one float per mask, or null
    }

Each mask is a compressed COCO RLE as `pycocotools.mask.encode` returns it for a column-major
uint8 `[H, W]` array, with `counts` decoded from bytes to an ASCII str. Any generator (SAM,
Mask2Former, ...) can produce it::

    rle = pycocotools.mask.encode(np.asfortranarray(mask.astype(np.uint8)))  # mask: [H, W] bool
    rle = {"size": [H, W], "counts": rle["counts"].decode("ascii")}

or, from Python, `StoredProposals(root).write(image_id, Proposals(masks, scores))`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from copatch.masks import decode_rle, encode_rle, pack_masks, unpack_masks
from copatch.prepare import find_prepared
from copatch.types import ImageSample


@dataclass
class Proposals:
    """Candidate masks of one image.

    Attributes:
        masks: `[N, H, W]` bool at the image's original resolution (`N` may be 0).
        scores: `[N]` float, or None.
    """

    masks: Tensor
    scores: Tensor | None = None

    def __post_init__(self) -> None:
        if self.masks.ndim != 3 or self.masks.dtype != torch.bool:
            raise ValueError(
                "proposal masks must be [N, H, W] bool, got "
                f"{tuple(self.masks.shape)} {self.masks.dtype}"
            )
        if self.scores is not None and tuple(self.scores.shape) != (self.masks.shape[0],):
            raise ValueError(
                f"proposal scores must be [N] = [{self.masks.shape[0]}], "
                f"got {tuple(self.scores.shape)}"
            )

    def __len__(self) -> int:
        return int(self.masks.shape[0])


@dataclass
class PackedProposals:
    """`Proposals` with the masks packed 8 pixels a byte: how DataLoader workers hand them over.

    Attributes:
        bits: `[N, ceil(H*W / 8)]` uint8 (`copatch.masks.pack_masks`).
        height, width: the masks' size.
        scores: `[N]` float, or None.
    """

    bits: Tensor
    height: int
    width: int
    scores: Tensor | None = None

    @classmethod
    def pack(cls, proposals: Proposals) -> "PackedProposals":
        h, w = (int(v) for v in proposals.masks.shape[-2:])
        return cls(pack_masks(proposals.masks), h, w, proposals.scores)

    def unpack(self) -> Proposals:
        """The `Proposals`, on the device `bits` is on (the GPU once Lightning moved the batch)."""
        return Proposals(unpack_masks(self.bits, (self.height, self.width)), self.scores)


@runtime_checkable
class MaskProposer(Protocol):
    """Anything that turns an image into candidate masks."""

    def __call__(self, sample: ImageSample) -> Proposals: ...


class StoredProposals:
    """Reads (and writes) proposals in the stored-proposal format of this module's docstring.

    Args:
        root: the folder holding `<image_id>.json` files.
        decode_in_workers: let DataLoader workers read and decode the files (`input_step`; ~80 ms of
            CPU an image for 200 masks of 640 x 480) and hand the masks over bit-packed (~8 MB an
            image through the workers' shared memory); False reads them in the main process.
    """

    def __init__(self, root: str | os.PathLike, decode_in_workers: bool = True) -> None:
        self.root = Path(root)
        # Private: where the decoding runs changes no mask, so it stays out of a run's fingerprint.
        self._decode_in_workers = decode_in_workers

    def path(self, image_id: int | str) -> Path:
        """Where the proposals of `image_id` live."""
        name = str(image_id)
        if not name or "/" in name or os.sep in name or name in (".", ".."):
            raise ValueError(f"image id {image_id!r} cannot be used as a file name")
        return self.root / f"{name}.json"

    def exists(self, image_id: int | str) -> bool:
        return self.path(image_id).is_file()

    def __call__(self, sample: ImageSample) -> Proposals:
        """The sample's proposals: decoded in a DataLoader worker (`input_step`) if they were, else now."""
        ready = find_prepared(sample, StoredProposalsInput(self))
        if isinstance(ready, PackedProposals):
            return ready.unpack()
        return self.load(sample.image_id, size=sample.size)

    def input_step(self) -> "StoredProposalsInput | None":
        """Reading and decoding as a `copatch.prepare.PrepareStep` for the DataLoader workers (None
        with `decode_in_workers=False`). The step calls this proposer's own `load`, so a subclass
        that changes `load` or `path` gets the same masks in a worker as in the main process."""
        return StoredProposalsInput(self) if self._decode_in_workers else None

    def load(self, image_id: int | str, size: tuple[int, int] | None = None) -> Proposals:
        """Load the proposals of `image_id`, checked against the image size `(H, W)` if given."""
        path = self.path(image_id)
        if not path.is_file():
            raise FileNotFoundError(
                f"no stored proposals for image {image_id!r}: expected {path}. Produce them with a "
                "proposer given a `cache_dir` (it writes this file), or write them from any mask "
                "generator in the stored-proposal format (see `copatch.proposals` docstring: one "
                "JSON file per image with COCO RLE masks)."
            )
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            height, width = int(record["height"]), int(record["width"])
            rles = record["masks"]
            scores = record.get("scores")
            if not isinstance(rles, list) or (scores is not None and len(scores) != len(rles)):
                raise ValueError("'masks' must be a list and 'scores' null or one float per mask")
            masks = decode_rle(rles, height, width)
            score_t = None if scores is None else torch.tensor(scores, dtype=torch.float32)
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as err:
            raise ValueError(
                f"corrupt stored proposals file {path}: {type(err).__name__}: {err}. Delete it and "
                "regenerate it (see the `copatch.proposals` docstring for the format)."
            ) from err
        if "image_id" in record and str(record["image_id"]) != str(image_id):
            raise ValueError(f"{path} holds image id {record['image_id']!r}, expected {image_id!r}")
        if size is not None and (height, width) != tuple(size):
            raise ValueError(
                f"stored proposals {path} are {height}x{width} (HxW) but the image is "
                f"{size[0]}x{size[1]}: proposals must be at the original image resolution. "
                "Regenerate them at that size (delete the file so a proposer with `cache_dir` "
                "recomputes it, or resize the masks to the original size before writing)."
            )
        return Proposals(masks=masks, scores=score_t)

    def write(
        self, image_id: int | str, proposals: Proposals, extra: Mapping[str, object] | None = None
    ) -> Path:
        """Write `proposals` for `image_id` atomically (a reader never sees a partial file).

        `extra`: more JSON keys for the record (a cache's checks, `copatch.proposal_cache`); `load`
        ignores them.
        """
        path = self.path(image_id)
        height, width = (int(s) for s in proposals.masks.shape[1:])
        scores = proposals.scores
        record = {
            "image_id": image_id,
            "height": height,
            "width": width,
            "masks": encode_rle(proposals.masks),
            # float32 -> Python float -> JSON repr round-trips exactly.
            "scores": None if scores is None else [float(s) for s in scores.cpu().tolist()],
            **(extra or {}),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f)
            os.replace(tmp, path)  # atomic on POSIX and Windows within one filesystem
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path


@dataclass(frozen=True)
class StoredProposalsInput:
    """`proposer.load` of a sample, packed, as a prepare step; keyed by the proposer's class and folder."""

    proposer: StoredProposals

    def key(self, size: tuple[int, int]) -> str:
        cls = type(self.proposer)
        return f"proposals:{cls.__module__}.{cls.__qualname__}:{self.proposer.root}"

    def __call__(self, sample: ImageSample) -> PackedProposals:
        return PackedProposals.pack(self.proposer.load(sample.image_id, size=sample.size))


class GroundTruthProposals:
    """The dataset's instance masks as proposals: an oracle, for analysis only."""

    def __call__(self, sample: ImageSample) -> Proposals:
        if sample.instance_masks is None:
            raise ValueError(
                f"image {sample.image_id!r} ({sample.file_name or 'no file name'}) carries no "
                "instance masks: GroundTruthProposals needs a DataModule that loads every "
                "annotated instance (ImageSample.instance_masks)."
            )
        return Proposals(masks=sample.instance_masks.bool())
