"""Large images at a reduced size: the resizing behind `CoPatch(max_side=...)`.

With `max_side` set, an image whose longer side exceeds it goes through the whole pipeline (proposer,
encoders, CoMap, pick) as a copy whose longer side is `max_side` (`reduced_size`, aspect ratio kept),
and the chosen mask is brought back to the original `H x W` before it is scored and returned. The
memory of an image then grows with `max_side**2` instead of `H * W`: at 4000 x 3000 each proposal
costs about 100 MB without it (README, "Performance").

- the image: area averaging (`resize_image`; torch's `area` mode, a box filter like PIL's `BOX` and
  OpenCV's `INTER_AREA`), rounded back to uint8. It is antialiased, as a shrinking filter must be, and
  exact on integer factors: an image upscaled k times by pixel repetition comes back as it was, so a
  reduced copy of an upsampled picture gives the picture's own results (the antialiased bilinear
  filter of PIL and torchvision spreads each output pixel over its neighbours too, which blurs the
  edges of flat regions and changed about one pick in five on the demo world's scenes upscaled 4x);
- masks (given or stored full-size proposals, ground truth, instance masks) going down, and the
  chosen mask going up: nearest neighbour at pixel centres (`resize_masks`): output pixel `i` takes
  input pixel `floor((i + 0.5) * H_in / H_out)`. It keeps masks bool, costs no float copy of the
  `[N, H, W]` proposals (an area rule would need one per mask), and going up it is exact: every
  output pixel is the value of the reduced pixel it lies in.

With `max_side` None, or an image that fits, nothing is resized and no result changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["reduced_size", "resize_image", "resize_masks"]


def reduced_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """The `(h, w)` an `(H, W)` image is processed at: `(H, W)` itself when `max_side` is None or
    `max(H, W) <= max_side`, else the longer side `max_side` and the shorter one scaled alike
    (rounded, at least 1)."""
    height, width = int(size[0]), int(size[1])
    if max_side is None or max(height, width) <= max_side:
        return height, width
    if height >= width:
        return int(max_side), max(1, round(width * max_side / height))
    return max(1, round(height * max_side / width)), int(max_side)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[3, H, W] uint8` -> `[3, h, w] uint8`, area averaging (each output pixel the mean of the input
    pixels under it; module docstring), rounded to the nearest integer. The same tensor when the size
    does not change."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None].float(), size=tuple(size), mode="area")[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _centres(n_out: int, n_in: int, device: torch.device) -> torch.Tensor:
    # Input index under the centre of each output pixel.
    idx = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * (n_in / n_out)).floor_().long()
    return idx.clamp_(0, n_in - 1)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[..., H, W]` masks (any dtype) -> `[..., h, w]`, nearest neighbour at pixel centres (module
    docstring). One gather into the output, no intermediate of the input's size. The same tensor
    when the size does not change."""
    height, width = int(masks.shape[-2]), int(masks.shape[-1])
    if (height, width) == tuple(size):
        return masks
    rows = _centres(int(size[0]), height, masks.device)
    cols = _centres(int(size[1]), width, masks.device)
    return masks[..., rows[:, None], cols[None, :]]
