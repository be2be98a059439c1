"""Backbone presets: the paper's hyperparameters per CLIP backbone, for `CoPatch.from_preset`.

`configs/model/<name>.yaml` hold the same values for the CLI (a test keeps them equal). `demo` is the
tiny CLIP trained on the demo world and shipped in the package.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # ViT-B/32 (OpenAI): l=10, delta=0.5, alpha=0.5; GEM on OpenAI ViT-B/16 as in the reference.
    "vitb32": dict(clip_model="ViT-B-32-quickgelu", clip_pretrained="weights/vitb32-openai.bin", exit_layer=10,
                   delta=0.5, alpha=0.5, top_k=3, gamma=0.5, gem_model="ViT-B-16-quickgelu",
                   gem_pretrained="weights/vitb16-openai.bin"),
    # ViT-B/16 (OpenAI): l=8, delta=0.3, alpha=0.7 (the released code); GEM reuses this CLIP.
    "vitb16": dict(clip_model="ViT-B-16-quickgelu", clip_pretrained="weights/vitb16-openai.bin", exit_layer=8,
                   delta=0.3, alpha=0.7, top_k=3, gamma=0.5, gem_depth=7, gem_size=448),
    # ViT-H/14 (LAION-2B): l=22, delta=0.5, alpha=0.5.
    "vith14": dict(clip_model="ViT-H-14", clip_pretrained="weights/vith14-laion2b.bin", exit_layer=22,
                   delta=0.5, alpha=0.5, top_k=3, gamma=0.5, gem_model="ViT-B-16-quickgelu",
                   gem_pretrained="weights/vitb16-openai.bin"),
    # Version 2 of the paper (copatch.siglip has what was read in the authors' code). DFN-5B ViT-H/14,
    # the only ViT-H/14 the authors' code loads (model/backbone.py: hf-hub:apple/DFN5B-CLIP-ViT-H-14):
    # l=22, delta=0.5, alpha=0.5, the paper's ViT-H/14 values.
    "vith14_dfn": dict(clip_model="ViT-H-14-quickgelu", clip_pretrained="weights/vith14-dfn5b.bin", exit_layer=22,
                       delta=0.5, alpha=0.5, top_k=3, gamma=0.5, gem_model="ViT-B-16-quickgelu",
                       gem_pretrained="weights/vitb16-openai.bin"),
    # SigLIP ViT-B/16 at 224 px (open_clip hf-hub:timm/ViT-B-16-SigLIP in the authors' code) and SigLIP-2
    # ViT-B/16 at 384 px (google/siglip2-base-patch16-384 in their multilingual scripts). No released
    # script sets l, delta or alpha for them: the ViT-B/16 values (12 blocks too) [inferred]. GEM stays on
    # OpenAI ViT-B/16, as in their SigLIP-2 scripts. The tokenizer is read from the checkpoint's folder.
    "siglip_b16": dict(clip_model="ViT-B-16-SigLIP", clip_pretrained="weights/siglip-b16/open_clip_model.safetensors",
                       exit_layer=8, delta=0.3, alpha=0.7, top_k=3, gamma=0.5, gem_model="ViT-B-16-quickgelu",
                       gem_pretrained="weights/vitb16-openai.bin"),
    "siglip2_b16": dict(clip_model="ViT-B-16-SigLIP2-384",
                        clip_pretrained="weights/siglip2-b16-384/open_clip_model.safetensors", exit_layer=8,
                        delta=0.3, alpha=0.7, top_k=3, gamma=0.5, gem_model="ViT-B-16-quickgelu",
                        gem_pretrained="weights/vitb16-openai.bin"),
    # The demo CLIP (6 blocks at 64 px), shipped in the package; see configs/demo.yaml.
    "demo": dict(clip_model="copatch-demo", clip_pretrained="package:weights/copatch-demo.pt", exit_layer=3,
                 delta=0.3, alpha=0.7, token_mask_blocks=2, gem_depth=4, gem_size=128),
}


# The proposer a preset gets when `from_preset` is given none: the demo world's flat-colour regions
# (no model, no download; `copatch.demo.proposer`). The real backbones have none: photos need SAM or
# Mask2Former weights, or stored proposals.
DEFAULT_PROPOSERS: dict[str, str] = {"demo": "copatch.demo.proposer.ColourRegionProposer"}


def default_proposer(name: str) -> Any:
    """A new instance of the preset's default proposer (`DEFAULT_PROPOSERS`), or None when it has none."""
    path = DEFAULT_PROPOSERS.get(name)
    if path is None:
        return None
    import importlib

    module, cls = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)()


def preset(name: str) -> dict[str, Any]:
    """A copy of the named preset's `CoPatch` arguments."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: use one of {sorted(PRESETS)}")
    return dict(PRESETS[name])
