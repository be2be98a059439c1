"""One-call use without a Trainer: turning a user's image, expressions and masks into an `ImageSample`.

`CoPatch.segment(image, expressions, proposals=None)` is built on these helpers. Inputs are checked,
never guessed: anything that does not follow the rules below is refused with a `copatch.errors`
exception (`UserTypeError`, `UserValueError`, `UserFileNotFound`) saying what was given and what to
pass instead.

Images (`image_tensor`), always returned as `[3, H, W] uint8` RGB:

- a PIL image, converted with PIL's own `convert("RGB")` (grayscale repeated, alpha dropped, a
  palette looked up), as the datasets read their files;
- a file path (`str` or `pathlib.Path`), opened with PIL the same way;
- a numpy array `[H, W]` (grayscale), `[H, W, 1]`, `[H, W, 3]` (RGB) or `[H, W, 4]` (RGBA: the alpha
  channel is dropped, as PIL does), channels last;
- a tensor `[H, W]`, `[1, H, W]`, `[3, H, W]` or `[4, H, W]`, channels first.

Pixel values: uint8 as they are; any other integer type when every value is in [0, 255]; a float type
when every value is in [0, 1] (scaled by 255 and rounded). Floats outside [0, 1] (such as 0-255 floats),
NaN, integers outside [0, 255] (a 16-bit image) and bool arrays (a mask, not an image) are refused.

Proposals (`as_proposals`), `[N, H, W]` at the image's size: bool, or a numeric type holding only the
values 0 and 1. Soft masks (probabilities, logits, 0/255 masks) are refused, not thresholded: the
threshold is the caller's choice (`probs > 0.5`), and a silent rule would be a guess.

Expressions (`expression_texts`): one string or a list (or tuple) of strings, each with at least one
non-space character.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from copatch.errors import UserFileNotFound, UserTypeError, UserValueError
from copatch.proposals import Proposals
from copatch.types import Expression, ImageSample

_IMAGE_KINDS = "a PIL image, a file path, an [H, W], [H, W, 3] or [H, W, 4] numpy array or a [3, H, W] tensor"


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """The image file at `path` as an `[H, W, 3] uint8` RGB array (PIL `convert("RGB")`).

    Raises:
        UserFileNotFound: there is no file at `path`.
        UserValueError: the file is not an image PIL can read, or it is truncated.
    """
    from PIL import Image

    file = Path(path)
    if not file.is_file():
        raise UserFileNotFound(f"image file {file} not found: pass the path of an existing image file, "
                               "or the image itself (PIL image, numpy array or tensor).")
    try:
        with Image.open(file) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserValueError(f"cannot read image file {file}: {err}. It is not an image PIL can open, or it is "
                             "truncated: replace it with a complete image file.") from err


def image_tensor(image: Any) -> torch.Tensor:
    """An image in any of the forms of the module docstring -> `[3, H, W] uint8` RGB.

    Raises:
        UserTypeError: not an image type, or a bool image.
        UserValueError: a shape that is not an image's, no pixels, or pixel values out of range.
        UserFileNotFound: a path with no file.
    """
    if isinstance(image, (str, os.PathLike)):
        image = read_image_file(image)
    elif hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            hint = " (channels first? numpy images are channels last: use .transpose(1, 2, 0))" \
                if image.ndim == 3 and image.shape[0] in (1, 3, 4) else ""
            raise UserValueError(f"a numpy image must be [H, W], [H, W, 3] or [H, W, 4], got shape {image.shape}{hint}")
        image = torch.from_numpy(_numpy_pixels(image)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise UserTypeError(f"image must be {_IMAGE_KINDS}, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        hint = " (channels last? image tensors are channels first: use .permute(2, 0, 1))" \
            if image.ndim == 3 and image.shape[-1] in (3, 4) else ""
        raise UserValueError(f"an image tensor must be [3, H, W] (or [H, W], [1, H, W], [4, H, W]), "
                             f"got shape {tuple(image.shape)}{hint}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise UserValueError(f"the image has no pixels: its size is {image.shape[1]}x{image.shape[2]}")
    if image.shape[0] == 1:  # grayscale: the same value in R, G and B, as PIL's convert("RGB")
        image = image.expand(3, -1, -1)
    return _tensor_pixels(image[:3]).contiguous()


def _numpy_pixels(image: np.ndarray) -> np.ndarray:
    """`[H, W, C]` numpy pixels -> a writeable array torch can take: uint8, or float (checked later)."""
    if image.dtype == np.bool_:
        raise UserTypeError("a bool array is a mask, not an image: pass uint8 pixels (mask.astype(np.uint8) * 255 "
                            "for a black-and-white picture)")
    if np.issubdtype(image.dtype, np.integer) and image.dtype != np.uint8:
        # Checked here: torch has few operations for uint16/uint32/uint64.
        if image.size and (image.min() < 0 or image.max() > 255):
            raise _integer_range_error(image.min(), image.max(), image.dtype)
        image = image.astype(np.uint8)
    elif not (image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating)):
        raise UserTypeError(f"a numpy image must hold uint8 (or float in [0, 1]) pixels, got dtype {image.dtype}")
    # np.asarray of a PIL image is read-only, and torch wants memory it may write.
    return np.array(image, copy=True) if not image.flags.writeable or not image.flags.c_contiguous else image


def _tensor_pixels(image: torch.Tensor) -> torch.Tensor:
    """`[3, H, W]` pixels of any dtype -> uint8, by the rules of the module docstring."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype == torch.bool:
        raise UserTypeError("a bool tensor is a mask, not an image: pass uint8 pixels (mask.to(torch.uint8) * 255 "
                            "for a black-and-white picture)")
    if image.is_floating_point():
        low, high = image.min(), image.max()  # NaN propagates to both, and fails the test below
        if not (0 <= low and high <= 1):
            raise UserValueError(f"a float image must hold values in [0, 1], got values in [{float(low):g}, "
                                 f"{float(high):g}]: divide 0-255 floats by 255, or pass uint8 pixels.")
        return (image.float() * 255).round().to(torch.uint8)
    if image.is_complex():
        raise UserTypeError(f"an image must hold uint8 (or float in [0, 1]) pixels, got dtype {image.dtype}")
    low, high = image.min(), image.max()
    if low < 0 or high > 255:
        raise _integer_range_error(low, high, image.dtype)
    return image.to(torch.uint8)


def _integer_range_error(low: Any, high: Any, dtype: Any) -> UserValueError:
    return UserValueError(f"an integer image must hold 8-bit values in [0, 255], got {dtype} values in "
                          f"[{int(low)}, {int(high)}]: convert it to 8 bits (uint8) first.")


def expression_texts(expressions: Any) -> list[str]:
    """`segment()`'s expressions, checked: one string or a list/tuple of E strings -> E strings.

    Raises:
        UserTypeError: not a string or a list of strings (an int, bytes, None in the list, ...).
        UserValueError: no expression, or an empty (whitespace-only) one.
    """
    def wrong(value: Any, where: str = "") -> UserTypeError:
        hint = ": decode bytes first (.decode())" if isinstance(value, (bytes, bytearray)) else ""
        return UserTypeError(f"segment() expressions must be a string or a list of strings, got "
                             f"{type(value).__name__}{where}{hint}")

    if isinstance(expressions, str):
        texts = [expressions]
    elif isinstance(expressions, (list, tuple)):
        texts = list(expressions)
    else:
        raise wrong(expressions)
    if not texts:
        raise UserValueError("segment() needs at least one expression, got an empty list")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise wrong(text, f" at position {i} of the list")
        if not text.strip():
            raise UserValueError(f"segment() expression {i} ({text!r}) is empty: every expression needs at "
                                 "least one word")
    return [str(t) for t in texts]


def make_sample(image: Any, expressions: str | Sequence[str], image_id: int | str = 0) -> ImageSample:
    """An `ImageSample` of one user image and its expressions, both checked (module docstring).

    Args:
        image: anything `image_tensor` takes (PIL, file path, numpy array, tensor).
        expressions: one expression or a list of E of them.
        image_id: the sample's image id.

    Returns:
        An `ImageSample` with `image` `[3, H, W] uint8` and E expressions with ids 0..E-1.
    """
    texts = expression_texts(expressions)
    file_name = str(image) if isinstance(image, (str, os.PathLike)) else "<segment>"
    return ImageSample(image_id=image_id, image=image_tensor(image),
                       expressions=[Expression(id=i, text=t) for i, t in enumerate(texts)], file_name=file_name)


def as_proposals(proposals: Any, size: tuple[int, int], reduced: tuple[int, int] | None = None) -> Proposals:
    """`[N, H, W]` masks (tensor, array or nested lists) or `Proposals` -> `Proposals` with `masks`
    `[N, H, W] bool`, checked against the image size `(H, W)` (or `reduced`, when given: the size
    `CoPatch(max_side=...)` works at, `copatch.resize.reduced_size`).

    Masks must be bool or hold only 0 and 1; soft masks are refused (module docstring).

    Raises:
        UserTypeError: not masks (strings, objects, ragged lists).
        UserValueError: not `[N, H, W]` at the image size, or values other than 0 and 1.
    """
    if isinstance(proposals, Proposals):
        masks = proposals.masks  # bool already (Proposals checks it)
    elif isinstance(proposals, torch.Tensor):
        masks = proposals
    else:
        try:
            masks = np.asarray(proposals)
        except ValueError as err:  # ragged nested lists
            raise UserTypeError(f"proposals must be [N, H, W] masks (a tensor or an array): {err}") from err
        if not (masks.dtype == np.bool_ or np.issubdtype(masks.dtype, np.number)):
            raise UserTypeError(f"proposals must be [N, H, W] bool masks (a tensor or an array), got "
                                f"{type(proposals).__name__} of dtype {masks.dtype}")
    if masks.ndim != 3 or (tuple(masks.shape[1:]) != tuple(size) and tuple(masks.shape[1:]) != reduced):
        hint = " (one mask? add a leading axis: mask[None])" if masks.ndim == 2 else ""
        also = "" if reduced is None else f" (or the max_side size {tuple(reduced)})"
        raise UserValueError(f"proposals must be [N, H, W] masks at the image size {size}{also}, got "
                             f"{tuple(masks.shape)}{hint}")
    is_tensor = isinstance(masks, torch.Tensor)
    if masks.dtype != (torch.bool if is_tensor else np.bool_):
        if masks.is_complex() if is_tensor else np.iscomplexobj(masks):
            raise UserTypeError(f"proposals must be bool masks, got dtype {masks.dtype}")
        binary = (masks == 0) | (masks == 1)  # NaN is neither
        if not bool(binary.all()):
            odd = masks[~binary]
            raise UserValueError(
                f"proposals must be bool masks (or hold only 0 and 1), got {masks.dtype} masks with other values "
                f"(e.g. {float(odd[0]):g}; range [{float(masks.min()):g}, {float(masks.max()):g}]). Soft masks are "
                "not thresholded for you: pass e.g. proposals=probabilities > 0.5 (or masks != 0 for 0/255 masks).")
        masks = masks != 0
    if isinstance(masks, np.ndarray):
        masks = torch.from_numpy(np.ascontiguousarray(masks))
    if isinstance(proposals, Proposals):
        return proposals
    return Proposals(masks)
