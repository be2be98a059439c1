"""SigLIP / SigLIP-2 vision towers (timm ViTs behind open_clip): the CoPatch paths they need.

open_clip builds SigLIP's image side as a `TimmModel`: `visual.trunk` is a timm `VisionTransformer`
and `visual.head` an (empty) adapter. Against the CLIP ViT (`copatch.backbone`) three things differ:

- no class token: every token of a block's output is a patch (`trunk.num_prefix_tokens == 0`), so
  token masking scales every token and the exit-layer features keep every token;
- no `ln_post(CLS) @ proj`: the image embedding is `trunk.norm`, then an attention-pool head (MAP: a
  learned query attends over the tokens, then an MLP), `fc_norm`, `trunk.head` and `visual.head`;
- the text side reads an HF tokenizer (SentencePiece for SigLIP, Gemma's for SigLIP-2, which is
  multilingual), named by the config's `hf_tokenizer_name`. copatch reads it from a local folder
  (`load_tokenizer`), never from the hub.

What the authors' code does (kaist-cvml/Biased2Grounded, commit ff96c622, `model/backbone.py`, class
`CLIPViTFM_Desktop(siglip=True)`, which loads open_clip `hf-hub:timm/ViT-B-16-SigLIP`), and the switch
that reproduces it (`copatch.switches`):

- exit-layer patch features (`forward`, masking type `ours_local`, SigLIP branch): blocks `0..l` of
  `visual.trunk.blocks`, then `visual.trunk.norm(-x)` over all tokens; no attention pool, no head.
  `siglip_patch_head="norm"` (reference). As released, that branch cannot run (it hands the raw image
  to the blocks and asserts on its shape); we read it with the patch embedding in front, as the
  tower's own `forward_features` does. `siglip_patch_head="pool"` instead runs each negated,
  normalised token alone through the tower's pooling head (`attn_pool` with that one token as key
  and value, `fc_norm`, `trunk.head`, `visual.head`): the SigLIP counterpart of CLIP's
  `ln_post(-x) @ proj`, which puts the patches in the text embedding space [inferred; the paper's
  description of the CLIP path].
- global mask embeddings (`forward` with any masking type but `crop` / `ours_local`): the function
  returns `visual(image * mask)`, each proposal resized (bool) to the input size: pixel masking and
  the full pooled embedding. `siglip_global="pixels"` (reference). The same function holds a SigLIP
  token-masking loop (every token times the mask on the patch grid before each block from
  `masking_block` on, then `trunk.norm`, `trunk.forward_head`, `visual.head`) that its early return
  never reaches: `siglip_global="tokens"`, the Global-Local token masking of the CLIP path.
- crops (`crop`): `visual(crop)`, the pooled embedding (as for CLIP).
- Spatial coherence: GEM stays on OpenAI ViT-B/16 (`multilingual_inference_siglip2_top3.py`:
  `gem.create_gem_model(model_name='ViT-B/16', pretrained='openai')` next to the SigLIP-2 model).

The authors' SigLIP-2 runs (`multilingual_inference_siglip2_*.py`, HF `google/siglip2-base-patch16-384`
through `transformers`) are Global-Local / HybridGL-style scripts without CoMap: masked-image
features, the HF tokenizer with `padding="max_length", truncation=True, max_length=64` (what open_clip's
`HFTokenizer` does), spaCy `en_core_web_lg` on the lower-cased expression of every language. Expressions
in any language go through the same pipeline here; the text tower decides what it understands.

The package also registers `copatch_tiny_siglip_224` with timm: SigLIP's layout (no class token, MAP
head) at width 32, for the tests and `copatch/model_configs/copatch-tiny-siglip.json`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import open_clip
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
import torch
import torchvision.transforms.functional as TF
from torch import nn

from copatch.errors import UserFileNotFound, UserValueError, knob

try:  # timm comes with open_clip_torch; without it there is no timm tower to handle
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer
except ImportError:  # pragma: no cover
    timm = None

__all__ = ["is_timm_tower", "tower_geometry", "project_timm_patches", "pixel_masked_embeddings",
           "load_tokenizer", "TokenizerMissing", "TOKENIZER_FILES"]

# What an HF tokenizer folder holds (any one of them is enough for `AutoTokenizer.from_pretrained`).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")


class TokenizerMissing(UserFileNotFound):
    """The HF tokenizer folder a SigLIP text tower needs is missing."""


def is_timm_tower(visual: nn.Module) -> bool:
    """Whether an open_clip vision tower is a timm model (SigLIP, SigLIP-2, ...)."""
    return hasattr(visual, "trunk") and not hasattr(visual, "transformer")


def tower_geometry(visual: nn.Module, model_name: str) -> tuple[int, int, int]:
    """`(input_size, grid, prefix_tokens)` of a timm ViT tower; refuses a tower without ViT blocks."""
    trunk = visual.trunk
    if not (hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed")):
        raise UserValueError(f"{model_name} has a timm vision tower {type(trunk).__name__} without ViT blocks "
                             f"(`trunk.blocks`, `trunk.patch_embed`): CoPatch needs a ViT. Set {knob('clip_model')} "
                             "to a ViT model (e.g. ViT-B-16-SigLIP).")
    grid = trunk.patch_embed.grid_size
    if grid[0] != grid[1]:
        raise UserValueError(f"{model_name} has a {grid[0]}x{grid[1]} patch grid; CoPatch needs a square one.")
    return int(visual.image_size[0]), int(grid[0]), int(getattr(trunk, "num_prefix_tokens", 0))


def project_timm_patches(visual: nn.Module, tokens: torch.Tensor, negate: bool = True,
                         head: str = "norm") -> torch.Tensor:
    """A block's output `[B, prefix + G*G, W]` -> patch features `[B, G*G, D]` (prefix tokens dropped).

    `head="norm"` (the reference): `trunk.norm(-x)`, width W. `head="pool"`: each normalised token
    alone through the pooling head (`attn_pool` over that one token, `fc_norm`, `trunk.head`,
    `visual.head`), width D of the joint embedding space.
    """
    trunk = visual.trunk
    patches = tokens[:, getattr(trunk, "num_prefix_tokens", 0):]
    if negate:
        patches = -patches
    normed = trunk.norm(patches)
    if head == "norm":
        return normed
    if head != "pool":
        raise ValueError(f"unknown siglip_patch_head {head!r}: use 'norm' or 'pool'")
    b, n, w = normed.shape
    single = normed.reshape(b * n, 1, w)
    pool = getattr(trunk, "attn_pool", None)
    pooled = pool(single) if pool is not None else single[:, 0]
    out = visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(pooled))))
    return out.reshape(b, n, -1)


@torch.no_grad()
def pixel_masked_embeddings(encode_image: Any, pixels: torch.Tensor, masks: torch.Tensor,
                            chunk: int = 64) -> torch.Tensor:
    """The reference's SigLIP global embeddings: `encode_image(pixels * mask)` per mask, `[N, D]`.

    Args:
        encode_image: `[B, 3, S, S] -> [B, D]` (the backbone's pooled image embedding).
        pixels: `[1, 3, S, S]` the normalised image at the input size.
        masks: `[N, H, W] bool` proposals at the image's resolution, resized (as bool: a pixel any part
            of the mask touches is in) to `S x S`, as the reference's `TF.resize` of a bool tensor does.
    """
    size = list(pixels.shape[-2:])
    out = []
    for start in range(0, masks.shape[0], chunk):
        m = TF.resize(masks[start:start + chunk].bool(), size, antialias=True).to(pixels.dtype)
        out.append(encode_image(pixels * m[:, None]))
    return torch.cat(out)


def _text_config(model_name: str) -> dict:
    cfg = open_clip.get_model_config(model_name) or {}
    return dict(cfg.get("text_cfg", {}))


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(model_name: str, pretrained: str | None = None, tokenizer: str | None = None) -> Any:
    """The text tower's tokenizer, never downloaded.

    - `tokenizer` given: an HF tokenizer folder (`tokenizer.json` ...), read with open_clip's
      `HFTokenizer` and the config's context length and `tokenizer_kwargs`.
    - a config with `hf_tokenizer_name` (SigLIP, SigLIP-2): the folder of the checkpoint file when it
      holds tokenizer files (what `hf download timm/ViT-B-16-SigLIP ... --local-dir DIR` writes next to
      the weights); with an open_clip tag instead of a file, open_clip's own lookup (hub cache only).
    - otherwise CLIP's bundled BPE (`SimpleTokenizer`), as `open_clip.get_tokenizer` gives it.
    """
    text_cfg = _text_config(model_name)
    context = text_cfg.get("context_length", 77)
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    mode = text_cfg.get("tokenizer_mode")
    if tokenizer is not None:
        folder = Path(tokenizer)
        if not _has_tokenizer(folder):
            raise TokenizerMissing(f"tokenizer folder {folder} does not exist or holds none of {', '.join(TOKENIZER_FILES)}. "
                                   f"{_tokenizer_fix(model_name)}")
        return HFTokenizer(str(folder), context_length=context, tokenizer_mode=mode, **kwargs)
    hf_name = text_cfg.get("hf_tokenizer_name")
    if not hf_name:
        return SimpleTokenizer(context_length=context, **kwargs)
    if pretrained and os.path.isfile(pretrained) and _has_tokenizer(Path(pretrained).parent):
        return HFTokenizer(str(Path(pretrained).parent), context_length=context, tokenizer_mode=mode,
                                     **kwargs)
    if pretrained and not os.path.isfile(pretrained) and os.sep not in pretrained:
        try:  # an open_clip tag: the tokenizer can only come from the local hub cache
            return open_clip.get_tokenizer(model_name)
        except Exception as err:  # noqa: BLE001 - any failure means the cache lacks it
            raise TokenizerMissing(f"the tokenizer {hf_name} of {model_name} is not in the local hub cache "
                                   f"({str(err).splitlines()[0][:200]}). {_tokenizer_fix(model_name)}") from err
    where = f"next to the checkpoint ({Path(pretrained).parent})" if pretrained else "anywhere"
    raise TokenizerMissing(f"{model_name} needs the HF tokenizer {hf_name}, and none was found {where}. "
                           f"{_tokenizer_fix(model_name)}")


def _tokenizer_fix(model_name: str) -> str:
    from copatch.downloads import download_for_clip, fetch_hint

    item = download_for_clip(model_name)
    fetch = fetch_hint(item.key) if item is not None else \
        "Fetch the model's open_clip repository (its tokenizer.json and tokenizer_config.json) on a machine with internet."
    return (f"Put the tokenizer files in the checkpoint's folder or pass the folder as ClipBackbone(tokenizer=...). "
            f"{fetch}")


def preprocess_mean_std(model_name: str, model: nn.Module) -> tuple[tuple, tuple]:
    """The mean/std the released weights of `model_name` were trained with (SigLIP: 0.5), else the
    model's own preprocess config (a checkpoint loaded from a file gets open_clip's OpenAI defaults)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
        if tag_cfg.get("mean") and tag_cfg.get("std"):
            return tuple(tag_cfg["mean"]), tuple(tag_cfg["std"])
    return (tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)), tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)))


if timm is not None:
    @register_model
    def copatch_tiny_siglip_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        """SigLIP's ViT layout (no class token, MAP head) at width 32: 12 blocks, 14x14 grid at 224 px."""
        if pretrained:
            raise ValueError("copatch_tiny_siglip_224 has no pretrained weights")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        args = dict(img_size=224, patch_size=16, embed_dim=32, depth=12, num_heads=2, class_token=False,
                    global_pool="map")
        return VisionTransformer(**{**args, **kwargs})
