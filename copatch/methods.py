"""Method presets: the zero-shot RIS pipelines CoPatch is compared with, as settings of the one module.

A method is a set of switches (`copatch.switches`) and a few `CoPatch` arguments: which candidates
(CoMap or the top-k by global-local score), which final pick (best score, or spatial relation +
coherence), with which weights. Backbone (`configs/model/`), proposer (`configs/proposers/`) and data
stay separate, so any proposer composes with any method; `configs/methods/<name>.yaml` hold the same
settings for the command line (a test keeps them equal), and `CoPatch.from_preset(..., method=name)` or
`method_arguments(name)` give them in Python.

    copatch predict --config configs/demo.yaml --config configs/methods/hybridgl.yaml
    copatch compare --config configs/demo.yaml --methods global_local,hybridgl,copatch

| method | candidates | final pick | reproduces |
|---|---|---|---|
| `global_local` | all proposals | best global-local score | Global-Local CLIP (Yu et al., CVPR'23) |
| `hybridgl` | top-3 by score | relation + GEM coherence, alpha 0.6 | HybridGL (Liu & Li, CVPR'25), its main script |
| `copatch` | CoMap `[g, b_1, b_2]` | relation + GEM coherence, alpha from the backbone preset | CoPatch, the authors' released code |
| `copatch_paper` | CoMap `[g, b_1, b_2, b_3]` | the same, paper switches | CoPatch as the paper describes it |

A method sets only the switches it names; the others come from the config it is composed with (the
reference defaults unless changed), so `--model.switches.parser spacy` after it applies to every
method. Each `Method` records what it reproduces, what it cannot here, and where its settings were read
in the peers' code (`Method.verified`: repository, commit, file, lines).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from copatch.errors import UserValueError
from copatch.switches import Switches
from copatch.text.parsing import NULL_KEYWORDS, RELATION_GROUPS, ParsedExpression, SpacyParser, keyword_by_head

__all__ = ["HYBRIDGL_RELATION_GROUPS", "METHODS", "Method", "HybridGLParser", "method", "method_arguments",
           "method_config"]

# HybridGL's relation keyword groups as its code runs them (utils.py, `extract_rela_word`): the "right"
# test is `token.text == RIGHT_KEYWORDS` (a string compared with a set, never true), so "right" and
# "east" are never a relation; its `WITHIN_KEYWORDS` has no "between". CoPatch's code fixed both.
HYBRIDGL_RELATION_GROUPS: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (name, frozenset() if name == "right" else words - {"between"}) for name, words in RELATION_GROUPS)
_DIFFERING_WORDS = frozenset({"right", "east", "between"})


class HybridGLParser(SpacyParser):
    """The spaCy parser with HybridGL's spatial-relation rule (`HYBRIDGL_RELATION_GROUPS`): "right",
    "east" and "between" never give a relation. Everything else (noun phrase, other nouns, direction
    words, which still include "right" and "between") is `SpacyParser`'s: HybridGL and CoPatch share
    those helpers. Only expressions holding one of those three words are parsed a second time.

    Args:
        model: the spaCy pipeline (as `SpacyParser`).
        batch_size: spaCy's batch size.
    """

    def parse(self, texts: Sequence[str]) -> list[ParsedExpression]:
        parsed = super().parse(texts)
        redo = [i for i, p in enumerate(parsed) if _DIFFERING_WORDS & set(p.sentence.split())]
        if redo:
            docs = self._load().pipe([parsed[i].sentence for i in redo], batch_size=self.batch_size)
            for i, doc in zip(redo, docs):
                p = parsed[i]
                relation = "none" if set(p.other_roots) & NULL_KEYWORDS else \
                    keyword_by_head(doc, HYBRIDGL_RELATION_GROUPS)
                parsed[i] = dataclasses.replace(p, relation=relation)
        return parsed


@dataclass(frozen=True)
class Method:
    """One method preset.

    Attributes:
        name: the preset's name (`configs/methods/<name>.yaml`).
        summary: one line: what it is.
        switches: the switches it sets (the others come from the config it is composed with).
        arguments: the other `CoPatch` arguments it sets (e.g. `alpha`).
        parser: class path of the parser it needs, or None (the one `switches.parser` names).
        reproduces: what of the original it reproduces here.
        cannot: what it cannot reproduce here.
        verified: where its settings were read in the original code (repository @ commit, file: lines).
    """

    name: str
    summary: str
    switches: dict[str, Any]
    arguments: dict[str, Any] = field(default_factory=dict)
    parser: str | None = None
    reproduces: str = ""
    cannot: str = ""
    verified: tuple[str, ...] = ()

    def apply(self, switches: Switches = Switches()) -> Switches:
        """`switches` with this method's switches set."""
        return dataclasses.replace(switches, **self.switches)


GLOBAL_LOCAL_REPO = "Seonghoon-Yu/Zero-shot-RIS @ 75ff6ed"
HYBRIDGL_REPO = "fhgyuanshen/HybridGL @ f7eb19b"
B2G_REPO = "kaist-cvml/Biased2Grounded @ ff96c62"

_PAPER = Switches.paper()

METHODS: dict[str, Method] = {m.name: m for m in (
    Method(
        "global_local",
        "Global-Local CLIP: the proposal with the best global-local score (top-1), no CoMap, no spatial guidance",
        switches=dict(use_comap=False, spatial_guidance=False),
        reproduces=(
            "the pick of Global-Local CLIP's main script: global embedding by token masking from block 9 (the last "
            "3 of 12 blocks), local embedding of the mask's box crop filled with the ImageNet mean's numbers, "
            "v-mix of the raw embeddings (v = visual_mix: 0.85 RefCOCOg, 0.95 otherwise), text r*E(s) + (1-r)*E(NP) "
            "with r = gamma = 0.5 and the spaCy noun-phrase rule, argmax of 100 * cosine; ImageNet mean/std input. "
            "Its top-3 oracle is the best of the 3 best-scored proposals. These equal CoPatch's reference settings, "
            "so the preset only switches CoMap and the spatial guidance off."),
        cannot=(
            "FreeSOLO proposals (not installable here: compose any proposer), FreeSOLO's own boxes for the crops "
            "(here the masks' boxes; a zero-width box is widened to the image edge instead of failing), the "
            "image resized to 800 px and back before the crops, and its ViT-B/32 backbone unless composed "
            "(configs/model/vitb32.yaml). An image without proposals counts IoU 0 here; its script skips it."),
        verified=(
            f"{GLOBAL_LOCAL_REPO} Our_method_with_free_solo.py L54: CLIPViTFM('ViT-B/32')",
            "Our_method_with_free_solo.py L65-66: v = 0.85 if refcocog else 0.95; r = 0.5",
            "Our_method_with_free_solo.py L89-97: fill (0.485, 0.456, 0.406) in the normalised image; "
            "TF.resized_crop(y1, x1, y2-y1, x2-x1) to 224 from FreeSOLO's pred_boxes",
            "Our_method_with_free_solo.py L101, model/backbone.py CLIPViTFM.forward L650-673: token masking "
            "from masking_block=9, masks TF.resize'd to the grid, CLS unmasked, ln_post + proj",
            "Our_method_with_free_solo.py L103, model/backbone.py L626-628: crop = full ViT, token 0",
            "Our_method_with_free_solo.py L105: v * mask_features + (1 - v) * crop_features (raw)",
            "Our_method_with_free_solo.py L108-125, utils.py extract_noun_phrase L31-70: lowercase, spaCy "
            "re-join, root-chunk noun phrase, r * E(s) + (1 - r) * E(NP)",
            "Our_method_with_free_solo.py L126-128, model/backbone.py calculate_score L567-580: 100 * cosine "
            "(normalised over dim 1 = channels of [N, D]), argmax: the pick",
            "data/dataset_refer_bert.py L163-165: Resize(800), ImageNet Normalize; "
            "Our_method_with_free_solo.py L79-81: an image without masks is skipped",
        ),
    ),
    Method(
        "hybridgl",
        "HybridGL: top-3 proposals by score, spatial relation + GEM spatial coherence (alpha 0.6), no CoMap",
        switches=dict(use_comap=False, spatial_guidance=True, box_format="xywh"),
        arguments=dict(alpha=0.6, top_k=3),
        parser="copatch.methods.HybridGLParser",
        reproduces=(
            "the pipeline of HybridGL's main script after its features: candidates = the top-3 (k1) proposals "
            "by softmaxed score; relation score over them against the candidates themselves, or against the "
            "top-6 (k2) proposals for the other nouns when the expression names some, on true XYWH boxes (SAM "
            "gives XYWH), softmaxed; GEM coherence of the noun phrase with the left/right/middle masks and "
            "black = 1.95 / 1.5 / 1.8; final = 0.4 * relation + 0.6 * coherence, argmax (a NaN wins, as "
            "torch.argmax); its relation words, where 'right', 'east' and 'between' are never a relation "
            "(HybridGLParser). Its top-3 oracle is the best of those 3 candidates."),
        cannot=(
            "its hybrid features (a blurred-background global image and a masked full-image local one fused "
            "G2L from block 9): the scores here are Global-Local CLIP's mask embeddings; SAM ViT-H proposals "
            "only with the weights (copatch.sam.SamProposer with points_per_side 8, pred_iou_thresh 0.7, "
            "stability_score_thresh 0.7, min_mask_region_area 800, crop_n_layers 0 is its RefCOCO setting); "
            "its GEM is the gem_torch package (here copatch.gem); its k1, once lowered for an image with fewer "
            "masks, stays lowered for the rest of the run (here min(3, N) per image)."),
        verified=(
            f"{HYBRIDGL_REPO} Hybridgl_main.py L57-58: r = 0.5, alpha = 0.6; L62-63: k1 = 3, k2 = 6",
            "Hybridgl_main.py L68-74: SamAutomaticMaskGenerator(points_per_side=8, pred_iou_thresh=0.7, "
            "stability_score_thresh=0.7, crop_n_layers=0, min_mask_region_area=800)",
            "Hybridgl_main.py L89-90: boxes = SAM's 'bbox' (XYWH), used by utils.relation_boxes L240-268",
            "Hybridgl_main.py L93-128, model/backbone.py CLIPViTFM.forward fusion_mode 'G2L' L227-261: hybrid "
            "features (not reproduced)",
            "Hybridgl_main.py L153-166: r-fused text, calculate_score; other nouns 'a photo of ' + chunk, mean "
            "(zeros when none)",
            "Hybridgl_main.py L168-171: 'pure hybridgl' = top-1 by score",
            "Hybridgl_main.py L173-196: softmax; topk k1 candidates; J = candidates if len(nouns) == 0 else top-k2 "
            "of the other-noun softmax; sum of relation_boxes; softmax over k1",
            "Hybridgl_main.py L198-223: GEM(tensor_img, [noun_phrase]), Resize(H, W, antialias), min-max, "
            "utils.gen_dir_mask L135-161, / mean, black 1.95 / 1.5 / 1.8, SC of every mask",
            "Hybridgl_main.py L225-228: (1 - alpha) * SR + alpha * SC over the k1 candidates, argmax",
            "Hybridgl_main.py L178-181: k1 = len(scores) when fewer, never reset",
            "utils.py extract_rela_word L207-237: L219 `token.text == RIGHT_KEYWORDS`; L205 WITHIN_KEYWORDS "
            "without 'between'; NULL_KEYWORDS L198 and extract_nouns L82-100 as CoPatch's",
            f"{B2G_REPO} src/utils.py extract_rela_word: `token.text in RIGHT_KEYWORDS`, WITHIN_KEYWORDS with "
            "'between' (CoPatch fixed both)",
        ),
    ),
    Method(
        "copatch",
        "CoPatch (the default): CoMap candidates [g, b_1, b_2], spatial relation + GEM coherence",
        switches=dict(negate_patches=True, use_comap=True, spatial_guidance=True),
        reproduces=(
            "CoPatch as the authors' released code runs it (configs/presets/reference.yaml, the default switches); "
            "composed after configs/presets/paper.yaml it is the paper's, since it sets only its three "
            "contributions' switches. alpha and delta come from the backbone preset (0.7 and 0.3 for ViT-B/16)."),
        cannot="Mask2Former proposals only with the weights (copatch.mask2former); see README, Reference or paper.",
        verified=(
            f"{B2G_REPO} (method-notes a.1-a.12): inference_newmask2former_vitb16.py, model/backbone.py, src/utils.py",
        ),
    ),
    Method(
        "copatch_paper",
        "CoPatch as the paper describes it (configs/presets/paper.yaml): cosine map, BFS clusters, [g, b_1, b_2, b_3]",
        switches={f.name: getattr(_PAPER, f.name) for f in dataclasses.fields(Switches)},
        reproduces="every switch of the paper preset (copatch/switches.py), the stanza parser included.",
        cannot=("the paper's exact context-token rule and gamma are not public (method-notes f.1): context tokens "
                "follow the authors' unused stanza helper. Without stanza's English models, add "
                "--model.switches.parser spacy."),
        verified=(f"{B2G_REPO} src/utils.py extract_noun_phrase_original (stanza agent rule)",),
    ),
)}

DEFAULT_METHODS = ("global_local", "hybridgl", "copatch")


def method(name: str) -> Method:
    """The named method preset.

    Raises:
        UserValueError: an unknown name (the message lists the known ones).
    """
    if name not in METHODS:
        raise UserValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)} (configs/methods/).")
    return METHODS[name]


def method_config(name: str) -> dict[str, Any]:
    """The method's settings as the `model:` part of a config (what `configs/methods/<name>.yaml` holds)."""
    m = method(name)
    model: dict[str, Any] = dict(m.arguments)
    model["switches"] = dict(m.switches)
    if m.parser is not None:
        model["parser"] = {"class_path": m.parser}
    return {"model": model}


def method_arguments(name: str, switches: Switches = Switches(), spacy_model: str | None = None) -> dict[str, Any]:
    """`CoPatch` keyword arguments of the method: `switches` (the given ones with the method's set), its
    other arguments and, when it needs one, its parser (built with `spacy_model`, or its default)."""
    m = method(name)
    out: dict[str, Any] = {**m.arguments, "switches": m.apply(switches)}
    if m.parser is not None:
        import importlib

        module, cls = m.parser.rsplit(".", 1)
        parser_cls = getattr(importlib.import_module(module), cls)
        out["parser"] = parser_cls(spacy_model) if spacy_model else parser_cls()
    return out
