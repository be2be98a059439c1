"""Behaviour switches: every place where the authors' released code departs from the paper.

The defaults reproduce the released code (the `reference` preset), because that is the code whose
numbers are published. `Switches.paper()` gives what the paper describes. A preset only sets
switches; each switch can still be set on its own (`configs/presets/*.yaml`, or in Python
`dataclasses.replace(Switches.paper(), clustering="greedy")`).

| switch | reference (default) | paper | what it changes |
|---|---|---|---|
| `input_norm` | `imagenet` | `clip` | mean/std used to normalise CLIP inputs |
| `crop_fill` | `raw_mean_values` | `mean_colour` | what fills the outside of a masked crop |
| `mask_feature_mix` | `raw` | `normalized` | L2-normalise global and local embeddings before the v-mix |
| `similarity_norm` | `patches` | `channels` | patch-text similarity: normalise over the patch axis, or true cosine |
| `clustering` | `greedy` | `bfs` | greedy non-merging 8-neighbour growth, or BFS connected components |
| `first_threshold` | `delta_minus_step` | `delta` | first cluster threshold tried: delta - 0.05, or delta |
| `cluster_order` | `python_set` | `seed_score` | order of the clusters (Python set order of ids, or by best patch) |
| `cluster_binarize` | `positive` | `half` | soft upsampled cluster `> 0` or `> 0.5` for the IoU with proposals |
| `keep_last_cluster` | False | True | candidates `[g, b_1, b_2]` (b_3 dropped) or `[g, b_1, ..., b_k]` |
| `box_format` | `xyxy_as_xywh` | `xywh` | boxes in the spatial-relation formulas: XYXY read as XYWH, or converted |
| `nan_policy` | `wins` | `loses` | a NaN final score (empty or full candidate mask) wins the pick, as torch.argmax does, or loses |
| `text_features` | `noun_phrase` | `context` | fuse E(s) with E(noun phrase) or with E(N_O + N_C) |
| `parser` | `spacy` | `stanza` | which parser gives the noun phrase / context tokens |
| `siglip_global` | `pixels` | `tokens` | SigLIP (timm tower) global mask embeddings: pixel-masked input, or token masking |
| `siglip_patch_head` | `norm` | `pool` | SigLIP exit-layer patches: `trunk.norm(-x)`, or also the pooling head per token |

Ablations of the paper's contributions, on in both presets: `negate_patches` (negate the exit-layer
patch tokens), `use_comap` (candidates from CoMap; off gives the paper's baseline, the top-k proposals
by global-local score) and `spatial_guidance` (the relation + coherence pick; off picks the candidate
with the best global-local score). Context tokens on/off is `text_features`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Switches:
    """Reference-vs-paper behaviour and ablations; the defaults are the released code (module docstring).

    Attributes:
        input_norm: mean/std that normalise CLIP inputs: imagenet (reference) or clip (paper).
        crop_fill: what fills the outside of a masked crop: raw_mean_values (reference) or mean_colour (paper).
        mask_feature_mix: raw (reference) or normalized (paper: L2-normalise global and local embeddings
            before the v-mix).
        similarity_norm: patch-text similarity normalised over the patch axis (patches, reference) or a
            true cosine (channels, paper).
        clustering: CoMap clusters by greedy non-merging 8-neighbour growth (reference) or BFS connected
            components (paper).
        first_threshold: first cluster threshold tried: delta - 0.05 (delta_minus_step, reference) or delta.
        cluster_order: cluster order: Python set order of ids (python_set, reference) or by best patch
            (seed_score, paper).
        cluster_binarize: a soft upsampled cluster is > 0 (positive, reference) or > 0.5 (half, paper) for
            its IoU with the proposals.
        keep_last_cluster: false: candidates [g, b_1, b_2] (reference drops b_3); true: [g, b_1, ..., b_k].
        box_format: boxes in the spatial-relation formulas: XYXY read as XYWH (xyxy_as_xywh, reference) or
            converted (xywh, paper).
        nan_policy: a NaN final score (empty or full candidate mask) wins the pick as torch.argmax does
            (wins, reference) or loses (paper).
        text_features: fuse E(s) with E(noun phrase) (noun_phrase, reference) or with E(N_O + N_C)
            (context, paper).
        parser: which parser gives the noun phrase / context tokens: spacy (reference) or stanza (paper).
        siglip_global: only for a timm vision tower (SigLIP): the global mask embeddings of the image
            times each mask at the input size (pixels, the reference's SigLIP path) or token masking
            with no class token (tokens; the CLIP path's method). See `copatch.siglip`.
        siglip_patch_head: only for a timm vision tower: exit-layer patches are `trunk.norm(-x)` (norm,
            the reference) or go on through the tower's pooling head token by token (pool) [inferred
            counterpart of CLIP's ln_post + proj].
        negate_patches: negate the exit-layer patch tokens (the paper's contribution; on in both presets).
        use_comap: candidates from CoMap; false gives the paper's baseline (top-k proposals by
            global-local score).
        spatial_guidance: the relation + coherence pick; false picks the candidate with the best
            global-local score.
    """

    input_norm: Literal["imagenet", "clip"] = "imagenet"
    crop_fill: Literal["raw_mean_values", "mean_colour"] = "raw_mean_values"
    mask_feature_mix: Literal["raw", "normalized"] = "raw"
    similarity_norm: Literal["patches", "channels"] = "patches"
    clustering: Literal["greedy", "bfs"] = "greedy"
    first_threshold: Literal["delta_minus_step", "delta"] = "delta_minus_step"
    cluster_order: Literal["python_set", "seed_score"] = "python_set"
    cluster_binarize: Literal["positive", "half"] = "positive"
    keep_last_cluster: bool = False
    box_format: Literal["xyxy_as_xywh", "xywh"] = "xyxy_as_xywh"
    nan_policy: Literal["wins", "loses"] = "wins"
    text_features: Literal["noun_phrase", "context"] = "noun_phrase"
    parser: Literal["spacy", "stanza"] = "spacy"
    siglip_global: Literal["pixels", "tokens"] = "pixels"
    siglip_patch_head: Literal["norm", "pool"] = "norm"
    negate_patches: bool = True
    use_comap: bool = True
    spatial_guidance: bool = True

    @classmethod
    def reference(cls) -> "Switches":
        """The authors' released code, every quirk included (the default)."""
        return cls()

    @classmethod
    def paper(cls) -> "Switches":
        """The method as the paper describes it."""
        return cls(input_norm="clip", crop_fill="mean_colour", mask_feature_mix="normalized",
                   similarity_norm="channels", clustering="bfs", first_threshold="delta", cluster_order="seed_score",
                   cluster_binarize="half", keep_last_cluster=True, box_format="xywh", nan_policy="loses",
                   text_features="context", parser="stanza", siglip_global="tokens", siglip_patch_head="pool")

    @classmethod
    def preset(cls, name: str) -> "Switches":
        presets = {"reference": cls.reference, "paper": cls.paper}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}: use one of {sorted(presets)}")
        return presets[name]()
