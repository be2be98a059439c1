"""The CLIP wrapper: tokenizer, text encoder, image encoder and exit-layer patch features.

Exit-layer patch features (CoPatch's "novel path", method-notes a.5): run the ViT, capture the output
of block `l` (0-based) with a forward hook, drop CLS, negate the raw residual-stream patch tokens, then
apply the final LayerNorm (with its affine) and the projection:

    P = ln_post(-x_l[:, 1:]) @ proj            # [B, G*G, D]

Note LN(-x) = beta - gamma * x_hat: only the normalised part flips, the bias does not. Without the
negation is a switch (`negate=False`), the paper's ablation.

A timm vision tower (SigLIP, SigLIP-2: no class token, an attention-pool head) takes the paths of
`copatch.siglip`: hooks on `visual.trunk.blocks`, every token a patch, and `trunk.norm(-x_l)` as the
authors' code computes it (`head="pool"` adds the tower's pooling head per token).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import open_clip
import torch
from torch import nn

from copatch.clip_model import create_clip, register_model_config, resolve_checkpoint
from copatch.hooks import capture_block_outputs
from copatch.siglip import is_timm_tower, load_tokenizer, preprocess_mean_std, project_timm_patches, tower_geometry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ClipBackbone(nn.Module):
    """A frozen open_clip CLIP (or SigLIP) with the handles CoPatch needs.

    Args:
        model_name: open_clip model name (see `copatch.clip_model.create_clip`).
        pretrained: local checkpoint path, open_clip tag, or None for random weights.
        model_config: optional open_clip JSON config to register first.
        tokenizer: an HF tokenizer folder for a text tower that reads one (SigLIP, SigLIP-2); None
            looks next to the checkpoint file (`copatch.siglip.load_tokenizer`). Never downloaded.
    """

    def __init__(self, model_name: str = "copatch-tiny", pretrained: str | None = None,
                 model_config: str | None = None, tokenizer: str | None = None) -> None:
        super().__init__()
        if model_config is not None:
            model_name = register_model_config(model_config)
        # The tokenizer first when the weights are there (a missing SigLIP tokenizer is found before
        # the model is built); a missing checkpoint is reported by create_clip first.
        checkpoint = resolve_checkpoint(pretrained)
        early = checkpoint is None or os.path.isfile(checkpoint)
        self.tokenizer = load_tokenizer(model_name, checkpoint, tokenizer) if early else None
        self.model = create_clip(model_name, pretrained)
        self.model_name = model_name
        if not early:
            self.tokenizer = load_tokenizer(model_name, checkpoint, tokenizer)
        visual = self.model.visual
        self.is_timm: bool = is_timm_tower(visual)
        if self.is_timm:
            self.input_size, self.grid, self.prefix_tokens = tower_geometry(visual, model_name)
            self.embed_dim: int = int(open_clip.get_model_config(model_name)["embed_dim"])
            self.clip_mean, self.clip_std = preprocess_mean_std(model_name, self.model)
        else:
            self.input_size: int = int(visual.image_size[0])
            self.grid: int = int(visual.grid_size[0])
            self.prefix_tokens: int = 1  # the class token
            self.embed_dim: int = int(visual.output_dim)
            clip_cfg = open_clip.get_model_preprocess_cfg(self.model)
            self.clip_mean = tuple(clip_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
            self.clip_std = tuple(clip_cfg.get("std", open_clip.OPENAI_DATASET_STD))

    @property
    def blocks(self) -> nn.ModuleList:
        """The ViT's residual blocks; hooks go on these."""
        visual = self.model.visual
        return visual.trunk.blocks if self.is_timm else visual.transformer.resblocks

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the image encoder's weights (its patch embedding)."""
        visual = self.model.visual
        return (visual.trunk.patch_embed.proj.weight if self.is_timm else visual.conv1.weight).dtype

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale) of the model, a 0-d float32 tensor (100 for OpenAI CLIP)."""
        return self.model.logit_scale.exp().float()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` normalised pixels -> `[B, D]` projected CLS embeddings (not L2-normalised)."""
        return self.model.encode_image(pixels)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> `[T, D]` raw text embeddings (not L2-normalised), one batched call."""
        tokens = self.tokenizer(list(texts)).to(self.model.logit_scale.device)
        return self.model.encode_text(tokens)

    def project_patches(self, tokens: torch.Tensor, negate: bool = True, head: str = "norm") -> torch.Tensor:
        """Block output `[B, prefix + G*G, W]` -> patch embeddings `[B, G*G, D]` (CLS dropped).

        `head` only matters for a timm tower (`copatch.siglip.project_timm_patches`): `norm` (the
        reference) or `pool`.
        """
        if self.is_timm:
            return project_timm_patches(self.model.visual, tokens, negate, head)
        patches = tokens[:, 1:]
        if negate:
            patches = -patches
        visual = self.model.visual
        return visual.ln_post(patches) @ visual.proj

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_blocks:
            raise ValueError(f"exit_layer={layer} is out of range for {self.model_name}, a ViT with "
                             f"{self.num_blocks} blocks: use a 0-based block index in [0, {self.num_blocks - 1}].")

    @torch.no_grad()
    def patch_features(self, pixels: torch.Tensor, layer: int, negate: bool = True, head: str = "norm") -> torch.Tensor:
        """`[B, 3, S, S]` -> exit-layer patch embeddings `[B, G*G, D]` (see the module docstring)."""
        self.check_layer(layer)
        with capture_block_outputs(self.blocks, [layer]) as captured:
            self.model.visual(pixels)
        return self.project_patches(captured[layer], negate, head)
