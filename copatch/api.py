"""One-call use without a Trainer: turning a user's image into an `ImageSample` and back.

`CoPatch.segment(image, expressions, proposals=None)` is built on these helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from copatch.proposals import Proposals
from copatch.types import Expression, ImageSample


def image_tensor(image: Any) -> torch.Tensor:
    """A PIL image, an `[H, W, 3]` uint8 array or a `[3, H, W]` tensor -> `[3, H, W] uint8` RGB.

    A float tensor is read as values in [0, 1].
    """
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a numpy image must be [H, W, 3] RGB, got shape {image.shape}")
        image = np.ascontiguousarray(image)
        if not image.flags.writeable:  # e.g. np.asarray of a PIL image: torch wants memory it may write
            image = image.copy()
        image = torch.from_numpy(image).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"an image tensor must be [3, H, W] RGB, got shape {tuple(image.shape)}")
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round()
    return image.to(torch.uint8)


def make_sample(image: Any, expressions: str | Sequence[str], image_id: int | str = 0) -> ImageSample:
    """An `ImageSample` of one user image and its expressions.

    Args:
        image: anything `image_tensor` takes (PIL, `[H, W, 3]` uint8 array, `[3, H, W]` tensor).
        expressions: one expression or a list of E of them.
        image_id: the sample's image id.

    Returns:
        An `ImageSample` with `image` `[3, H, W] uint8` and E expressions with ids 0..E-1.
    """
    texts = [expressions] if isinstance(expressions, str) else list(expressions)
    if not texts:
        raise ValueError("segment() needs at least one expression")
    return ImageSample(image_id=image_id, image=image_tensor(image),
                       expressions=[Expression(id=i, text=t) for i, t in enumerate(texts)], file_name="<segment>")


def as_proposals(proposals: Any, size: tuple[int, int]) -> Proposals:
    """`[N, H, W]` masks (tensor or array, read as bool) or `Proposals` -> `Proposals` with `masks`
    `[N, H, W] bool`, checked against the image size `(H, W)`."""
    if isinstance(proposals, Proposals):
        return proposals
    masks = torch.as_tensor(np.asarray(proposals) if not isinstance(proposals, torch.Tensor) else proposals)
    if masks.ndim != 3 or tuple(masks.shape[1:]) != size:
        raise ValueError(f"proposals must be [N, H, W] masks at the image size {size}, got {tuple(masks.shape)}")
    return Proposals(masks.bool())
