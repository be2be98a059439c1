"""Forward hooks on whole ViT blocks (`visual.transformer.resblocks[i]`), always removed on exit.

open_clip is never forked or monkey-patched: the two things CoPatch needs from inside the ViT are
done with hooks that live only inside a `with` block, so they cannot leak onto a host model or
survive an exception.

Token layout (open_clip >= 2.32, batch first): a block maps `[B, 1 + G*G, W]` to the same shape;
token 0 is CLS, the rest are the patches in row-major order. A timm tower (SigLIP) has no class token:
its blocks (`visual.trunk.blocks`) map `[B, G*G, W]`, every token a patch (`prefix_tokens=0`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def capture_block_outputs(blocks: Sequence[nn.Module], indices: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the outputs of `blocks[i]` for each `i` in `indices` (0-based, as in the reference code).

    Yields a dict filled during the forward pass: `{i: [B, 1 + G*G, W]}` (raw residual stream, before
    `ln_post`). Block i's output is what `forward_intermediates(indices=[i])` returns (with CLS).
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for i in indices:
            if not -len(blocks) <= i < len(blocks):
                raise IndexError(f"block index {i} is out of range for a ViT with {len(blocks)} blocks")

            def hook(_module, _args, output, i=i):
                captured[i] = output

            handles.append(blocks[i].register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def mask_patch_tokens(blocks: Sequence[nn.Module], start: int, weights: torch.Tensor,
                      prefix_tokens: int = 1) -> Iterator[None]:
    """Token masking (Global-Local CLIP): scale the patch tokens entering every block from `start` on.

    At block `start` a single image's tokens `[1, L, W]` are expanded to one copy per mask `[N, L, W]`;
    from then on each copy's patch tokens are multiplied by its mask weights before every block, and the
    CLS token is left untouched. The model's pooled output is then one embedding per mask.

    Args:
        blocks: the ViT's residual blocks.
        start: the first masked block (9 for a 12-block ViT in the reference).
        weights: `[N, G*G]` per-patch weights (each mask resized to the patch grid).
        prefix_tokens: tokens before the patches, left untouched (1: CLIP's class token; 0: SigLIP,
            whose every token is scaled, as the authors' SigLIP token-masking loop does).
    """

    def pre_hook(_module, args, kwargs):
        x = args[0]
        if x.shape[0] == 1 and weights.shape[0] != 1:
            x = x.expand(weights.shape[0], -1, -1)
        scale = torch.cat([torch.ones_like(weights[:, :1]).expand(-1, prefix_tokens), weights], dim=1).to(x.dtype)
        return (x * scale[:, :, None],) + tuple(args[1:]), kwargs

    handles = [blocks[i].register_forward_pre_hook(pre_hook, with_kwargs=True) for i in range(start, len(blocks))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
