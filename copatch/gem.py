"""GEM heat maps (Grounding Everything, Bousselham et al.) on an unmodified open_clip CLIP.

CoPatch's spatial-coherence score (method-notes a.10, g.5) takes its heat map from GEM, which the
reference runs through the pip package `gem_torch` on top of open_clip 2.24. That package rewires the
model in place; here the same numbers are computed from the blocks' own weights, leaving the model
untouched. The image side (`gem_transform`, `gem_patch_features`) depends on the image only and runs
once per image; the text side is `gem_heatmaps`, one cheap product per expression.

What GEM computes, as read in the reference code (WalBouss/GEM at a739251; `gem/gem.py`,
`gem/gem_wrapper.py`, `gem/gem_utils.py`) and in its two callers (fhgyuanshen/HybridGL
`Hybridgl_main.py` + `data/dataset_refer_bert.py`; kaist-cvml/Biased2Grounded
`inference_newmask2former_vitb16.py` + `dataset/dataset_refer_bert.py`):

* Model and call. `gem.create_gem_model('ViT-B/16', 'openai')` with the defaults `gem_depth=7`,
  `ss_attn_iter=1`, `ss_attn_temp=None`; both callers use `gem_model(image, [noun_phrase])[0]`, i.e.
  `GEMWrapper.forward` (no x100 factor; only `batched_forward` has one, and min-max removes it anyway).
* Which blocks (gem_wrapper.py, `apply_gem`). `for i in range(1, depth)` wraps `resblocks[-i]`, so
  depth `k` gives the last `k - 1` blocks the self-self path: blocks 6..11 of a 12-block ViT for k=7.
* Embedding (gem_utils.py, `modified_vit_forward`). conv1 -> tokens, class token first, plus the
  positional embedding, patch dropout, `ln_pre`. When the token count differs from the native one, the
  patch part of the positional embedding is resampled on its square grid with
  `F.interpolate(mode='bicubic', antialias=True)` (align_corners left at its default, False); the
  class position is kept. 14x14 -> 28x28 for a 448 px input to ViT-B/16.
* Two streams (gem_utils.py, `GEMResidualBlock`). The ordinary stream runs every block unchanged. The
  GEM stream starts as the *input* of the first wrapped block. In each wrapped block the self-self
  attention reads `ln_1` of the *ordinary* stream (not of the GEM stream), and the GEM stream only
  accumulates `ls_1(out_proj(self_self_attention))`: a residual, no `ln_2`, no MLP.
* Self-self attention (gem_utils.py, `SelfSelfAttention.forward`), on y = ln_1(x_ordinary):
  q, k, v from `in_proj_weight/in_proj_bias`, split into heads of width d (head width, 64 for
  ViT-B/16). The inverse temperature is one number per image: the L2 norm of each token of y over the
  full width, averaged over all tokens (CLS included), times d^-1/2. For each of z in (q, k, v)
  separately: `ss_attn_iter` times { z <- normalize(z); z <- softmax(t * z z^T) z }, then once more
  z <- normalize(z), A_z = softmax(t * z z^T), and the output A_z v uses the *original* v. The three
  outputs are averaged ((q + k + v paths) / 3), heads are concatenated and `out_proj` is applied.
* Output. `ln_post` and `@ proj` on every token of the GEM stream, L2-normalised per token, CLS dropped.
* Heat map (gem_wrapper.py, `forward`). Text prompt `f'a photo of a {cls}.'`, text embedding
  L2-normalised; patch-text dot products reshaped row-major to the grid, `F.interpolate(size=input
  size, mode='bilinear')` (align_corners False, no antialias), then per prompt
  (x - min) / (max - min) over the whole map.
* Image transform (gem.py, `get_gem_img_transform`). `Resize((448, 448), BICUBIC)`, `ToTensor`,
  `Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)`. Both callers apply it to a PIL image
  (`Image.open(...).convert("RGB")`), so the resize is PIL's bicubic (antialiased, rounded to uint8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dataclasses import dataclass

from copatch.hooks import capture_block_outputs

GEM_SIZE = 448
GEM_DEPTH = 7


def gem_text_prompt(noun_phrase: str) -> str:
    """The prompt GEM encodes for a class name / noun phrase."""
    return f"a photo of a {noun_phrase}."


def gem_transform(image: torch.Tensor, size: int = GEM_SIZE,
                  mean: Sequence[float] = open_clip.OPENAI_DATASET_MEAN,
                  std: Sequence[float] = open_clip.OPENAI_DATASET_STD) -> torch.Tensor:
    """`[3, H, W]` uint8 RGB -> `[3, size, size]` float32, normalised: the reference's GEM input.

    The resize goes through PIL because the reference resizes a PIL image. Tensor resizes do not give
    the same pixels: torchvision's bicubic on tensors differs from PIL by up to ~9 grey levels, and even
    `F.interpolate(uint8, 'bicubic', antialias=True)`, the closest, is off by a few levels on some sizes.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"gem_transform expects a [3, H, W] uint8 RGB tensor, got {image.dtype} {tuple(image.shape)}")
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy())
    pil = pil.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div_(255)
    mean_t = torch.tensor(mean, dtype=pixels.dtype)[:, None, None]
    std_t = torch.tensor(std, dtype=pixels.dtype)[:, None, None]
    return (pixels - mean_t) / std_t



@dataclass(frozen=True)
class GemInput:
    """`gem_transform` as a `copatch.prepare.PrepareStep`, so that it can run in DataLoader workers.

    The key holds every setting (size, mean, std): an input prepared for another GEM CLIP is not used.
    """

    size: int = GEM_SIZE
    mean: tuple[float, ...] = tuple(open_clip.OPENAI_DATASET_MEAN)
    std: tuple[float, ...] = tuple(open_clip.OPENAI_DATASET_STD)

    def key(self, size: tuple[int, int]) -> str:
        return f"gem:{self.size}:{','.join(map(repr, self.mean))}:{','.join(map(repr, self.std))}"

    def __call__(self, sample) -> torch.Tensor:
        """The sample's `image` `[3, H, W] uint8` -> `[3, size, size] float32`."""
        return gem_transform(sample.image, self.size, self.mean, self.std)

def resize_positional_embedding(pos: torch.Tensor, new_grid: int) -> torch.Tensor:
    """`[1 + G*G, W]` -> `[1 + new_grid**2, W]`: the class position kept, the patch grid resampled.

    Bicubic with antialias=True, as GEM does it. The antialiased bicubic kernel differs from the plain
    one (a = -0.5 instead of -0.75, other border handling) even when upsampling, so the flag matters.
    """
    old_grid = math.isqrt(pos.shape[0] - 1)
    if old_grid * old_grid != pos.shape[0] - 1:
        raise ValueError(f"positional embedding of {pos.shape[0]} tokens is not 1 + a square grid")
    if new_grid == old_grid:
        return pos
    grid = pos[1:].reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)      # [1, W, G, G]
    # In float32: the antialiased bicubic kernel has no bf16 CPU implementation (a host in bf16-true).
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", antialias=True).to(pos.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1)
    return torch.cat([pos[:1], grid], dim=0)


def _embed(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """`[B, 3, S, S]` -> tokens `[B, 1 + G'*G', W]` entering block 0, for any S divisible by the patch.

    Written out instead of calling `visual._embeds`: that adds the native positional embedding and so
    only accepts the native size, and swapping the model's parameter would modify the model.
    """
    x = visual.conv1(pixels)                                                   # [B, W, G', G']
    grid = x.shape[2]
    if x.shape[3] != grid:
        raise ValueError(f"GEM needs a square input, got {tuple(pixels.shape[-2:])}")
    x = x.flatten(2).transpose(1, 2)                                           # [B, G'*G', W]
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + resize_positional_embedding(visual.positional_embedding, grid).to(x.dtype)
    x = visual.patch_dropout(x)
    return visual.ln_pre(x)


def self_self_attention(attn: nn.MultiheadAttention, y: torch.Tensor, iters: int = 1,
                        temperature: float | None = None) -> torch.Tensor:
    """GEM's q-q / k-k / v-v attention on `y = ln_1(x)` `[B, N, W]` -> `[B, N, W]` (after out_proj).

    `temperature` (an inverse temperature) defaults to GEM's per-image choice: the mean token norm of
    `y` times head_width^-1/2.
    """
    if attn.in_proj_weight is None:
        raise ValueError("GEM needs an attention with a packed in_proj_weight (q, k and v of one width)")
    b, n, w = y.shape
    heads = attn.num_heads
    d = w // heads
    qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)                 # [B, N, 3W]
    qkv = qkv.reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)               # [3 (q,k,v), B, h, N, d]
    v = qkv[2]
    if temperature is None:
        inv_temp = y.norm(dim=-1).mean(dim=-1).reshape(1, b, 1, 1, 1) * d ** -0.5
    else:
        inv_temp = temperature
    # The three paths are independent, so they run stacked on the leading axis.
    z = qkv
    for _ in range(iters):
        z = F.normalize(z, dim=-1)
        z = torch.softmax(inv_temp * (z @ z.transpose(-2, -1)), dim=-1) @ z
    z = F.normalize(z, dim=-1)
    weights = torch.softmax(inv_temp * (z @ z.transpose(-2, -1)), dim=-1)    # [3, B, h, N, N]
    out = (weights @ v).mean(dim=0)                                            # [B, h, N, d]
    out = out.transpose(1, 2).reshape(b, n, w)
    return attn.out_proj(out)


@torch.no_grad()
def gem_patch_features(model: nn.Module, pixels: torch.Tensor, depth: int = GEM_DEPTH, iters: int = 1,
                       temperature: float | None = None) -> torch.Tensor:
    """`[B, 3, S, S]` (see `gem_transform`) -> GEM patch features `[B, G'*G', D]`, L2-normalised.

    Args:
        model: an open_clip CLIP (its `.visual` a VisionTransformer with standard residual blocks).
        pixels: normalised images; S a multiple of the patch size, any multiple (448 for ViT-B/16).
        depth: GEM's `gem_depth`: the last `depth - 1` blocks get the self-self path.
        iters: GEM's `ss_attn_iter`.
        temperature: GEM's `ss_attn_temp` (None: the per-image default, see `self_self_attention`).
    """
    visual = model.visual
    transformer = visual.transformer
    blocks = transformer.resblocks
    n_blocks = len(blocks)
    if not 2 <= depth <= n_blocks + 1:
        raise ValueError(f"GEM depth {depth} is out of range for a ViT with {n_blocks} blocks: use 2..{n_blocks + 1} "
                         f"(depth k gives the last k - 1 blocks the self-self path)")
    start = n_blocks - (depth - 1)

    x0 = _embed(visual, pixels)
    # The ordinary stream, unchanged: the GEM stream needs the input of every block from `start` on,
    # i.e. the outputs of blocks start-1 .. n-2 (x0 itself when start is 0).
    wanted = list(range(max(start - 1, 0), n_blocks - 1))
    with capture_block_outputs(blocks, wanted) as captured:
        transformer(x0)  # takes [B, L, W] either way; blocks see [L, B, W] when not batch_first

    def block_input(i: int) -> torch.Tensor:
        if i == 0:
            return x0
        h = captured[i - 1]
        return h if transformer.batch_first else h.transpose(0, 1)

    gem = block_input(start)
    for i in range(start, n_blocks):
        block = blocks[i]
        y = block.ln_1(block_input(i))
        gem = gem + block.ls_1(self_self_attention(block.attn, y, iters, temperature))

    features = visual.ln_post(gem[:, 1:])
    if visual.proj is not None:
        features = features @ visual.proj
    return F.normalize(features, dim=-1)


def gem_heatmaps(patch_features: torch.Tensor, text: torch.Tensor, size: int = GEM_SIZE) -> torch.Tensor:
    """Patch features `[P, D]` (L2-normalised, from `gem_patch_features`) and text `[E, D]` -> `[E, size, size]`.

    Dot product with the L2-normalised text, the `sqrt(P) x sqrt(P)` grid upsampled bilinearly
    (align_corners False) to `size`, then min-max per expression to [0, 1]. A constant map gives
    0/0 = NaN, as in the reference.
    """
    grid = math.isqrt(patch_features.shape[0])
    if grid * grid != patch_features.shape[0]:
        raise ValueError(f"{patch_features.shape[0]} patch features do not form a square grid")
    text = F.normalize(text.to(patch_features.dtype), dim=-1)
    scores = (patch_features @ text.T).T.reshape(1, -1, grid, grid)            # [1, E, G', G']
    maps = F.interpolate(scores, size=(size, size), mode="bilinear")[0]        # [E, size, size]
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    return (maps - low) / (high - low)
