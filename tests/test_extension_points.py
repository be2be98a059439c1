"""Extension points: the overridable stages of `CoPatch` (the table in its docstring).

The built-in path must go through every one of them (so they cannot rot), a subclass must be able to
replace each, and replacing the final pick with the oracle must give the top-3 oracle metric.
"""

import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from copatch.comap import Clusters
from copatch.datamodules.refer import ReferDataModule, ReferDataset
from copatch.demo.datamodule import DemoReferDataModule
from copatch.image_features import ImageFeatures
from copatch.metrics import intersection_union, iou_from_counts
from copatch.module import CoPatch, ExpressionCues
from copatch.proposals import GroundTruthProposals, Proposals, StoredProposals
from copatch.selection import Selection
from copatch.switches import Switches
from copatch.text.features import ExpressionTexts
from copatch.text.parsing import ParsedExpression

EXTENSION_POINTS = ["propose", "parse", "encode_text", "encode_image", "patch_features", "comap",
                    "cluster_overlaps", "select", "pick"]


def _model(tiny_config, cls=CoPatch, **kw):
    torch.manual_seed(0)
    kw.setdefault("proposer", GroundTruthProposals())  # the oracle, by name: there is no default proposer
    return cls(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128, **kw)


def _sample(toy_root):
    return next(s for s in ReferDataset(str(toy_root), split="val") if len(s.expressions) > 2)


def _summary(preds):
    return [(p.expression_id, p.chosen, p.candidates, p.candidate_scores, p.clusters.tolist()) for p in preds]


def test_the_docstring_table_names_every_extension_point():
    rows = re.findall(r"^\s*\| `(\w+)\(", CoPatch.__doc__, flags=re.M)
    assert rows == EXTENSION_POINTS
    for name in rows:
        method = getattr(CoPatch, name)
        assert callable(method) and "Extension point" in method.__doc__, name


class Recorder(CoPatch):
    """Observes every extension point (calls super and records its inputs and output)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: dict[str, list] = {name: [] for name in EXTENSION_POINTS}


def _observer(name):
    def observe(self, *args):
        out = getattr(super(Recorder, self), name)(*args)
        self.calls[name].append((args, out))
        return out
    observe.__name__ = name
    return observe


for _name in EXTENSION_POINTS:
    setattr(Recorder, _name, _observer(_name))


def test_the_built_in_path_goes_through_every_extension_point(tiny_config, toy_root):
    sample = _sample(toy_root)
    plain = _model(tiny_config).predict_step([sample])
    recorder = _model(tiny_config, Recorder)
    preds = recorder.predict_step([sample])
    assert _summary(preds) == _summary(plain), "observing changes nothing"

    e, calls = len(sample.expressions), recorder.calls
    assert Counter({k: len(v) for k, v in calls.items()}) == Counter(
        propose=1, parse=1, encode_text=1, encode_image=1, patch_features=1, cluster_overlaps=1,
        comap=e, select=e, pick=e)
    # The documented inputs and outputs.
    (proposals,) = [out for _, out in calls["propose"]]
    n, (h, w) = len(proposals), sample.size
    assert isinstance(proposals, Proposals) and proposals.masks.shape == (n, h, w)
    parsed = calls["parse"][0][1]
    assert len(parsed) == e and all(isinstance(p, ParsedExpression) for p in parsed)
    texts = calls["encode_text"][0][1]
    d = recorder.backbone.embed_dim
    assert isinstance(texts, ExpressionTexts) and texts.fused.shape == (e, d) and texts.negatives.shape == (e, d)
    (_, masks), feats = calls["encode_image"][0]
    assert masks.shape == (n, h, w) and isinstance(feats, ImageFeatures)
    assert feats.boxes.shape == (n, 4) and feats.mask_embeddings.shape == (n, d)
    g = recorder.backbone.grid
    (_, patches), out = calls["patch_features"][0]
    assert patches.shape == (g * g, d) and out is patches and feats.patch_embeddings is out
    for (scores,), clusters in calls["comap"]:
        assert scores.shape == (g * g,) and scores.dtype == torch.float32
        assert isinstance(clusters, Clusters) and clusters.labels.shape == (g, g)
    (clusters, _), overlaps = calls["cluster_overlaps"][0]
    assert [o.shape for o in overlaps] == [(min(3, len(c.order)), n) for c in clusters]
    for ((scores, iou), selection), ((sel, cues), (chosen, cand_scores)), pred in zip(
            calls["select"], calls["pick"], preds):
        assert scores.shape == (n,) and iou.shape[1] == n and isinstance(selection, Selection)
        assert sel is selection and isinstance(cues, ExpressionCues)
        assert cues.target is not None and cues.target.shape == (h, w) and cues.target.dtype == torch.bool
        assert chosen == pred.chosen in selection.candidates and len(cand_scores) == len(selection.candidates)


class LastCandidate(CoPatch):
    def pick(self, selection, cues):
        return selection.candidates[-1], [0.0] * len(selection.candidates)


class WholeSentence(CoPatch):
    def parse(self, sample):
        return [ParsedExpression(sentence=e.text, noun_phrase=e.text, target=e.text, context=(), head_noun=e.text,
                                 other_nouns=()) for e in sample.expressions]


class CoarsePatches(CoPatch):
    def patch_features(self, sample, patches):
        g = self.backbone.grid
        grid = patches.T.reshape(1, -1, g, g)
        return F.avg_pool2d(grid, 2).flatten(2)[0].T  # [(G/2)^2, D]


class OneCluster(CoPatch):
    def comap(self, scores):
        g = int(scores.numel() ** 0.5)
        return Clusters(torch.ones(g, g, dtype=torch.int64), [1], 0.0)


class TopByScore(CoPatch):
    def select(self, mask_scores, cluster_iou):
        best = torch.topk(mask_scores, k=min(2, mask_scores.numel())).indices.tolist()
        return Selection(best[0], [], best)


class SwappedTexts(CoPatch):
    def encode_text(self, parsed):
        texts = super().encode_text(parsed)
        texts.fused = texts.fused.flip(0)
        return texts


@pytest.mark.parametrize("cls", [LastCandidate, WholeSentence, CoarsePatches, OneCluster, TopByScore, SwappedTexts])
def test_each_stage_can_be_replaced(cls, tiny_config, toy_root):
    sample = _sample(toy_root)
    base = _model(tiny_config).predict_step([sample])
    preds = _model(tiny_config, cls).predict_step([sample])
    assert [p.expression_id for p in preds] == [e.id for e in sample.expressions]
    g = _model(tiny_config).backbone.grid
    if cls is LastCandidate:
        assert all(p.chosen == p.candidates[-1] for p in preds)
    elif cls is WholeSentence:
        assert all(p.extras["noun_phrase"] == p.text for p in preds)
    elif cls is CoarsePatches:
        assert all(p.clusters.shape[-2:] == (g // 2, g // 2) for p in preds)
    elif cls is OneCluster:
        assert all(p.clusters.shape == (1, g, g) and p.clusters.all() for p in preds)
    elif cls is TopByScore:
        assert all(len(p.candidates) == 2 and p.candidates[0] == p.extras["top1"] for p in preds)
    elif cls is SwappedTexts:  # the CoMap of expression i is now that of expression E-1-i
        assert [p.clusters.tolist() for p in preds] == [p.clusters.tolist() for p in reversed(base)]


class OraclePick(CoPatch):
    """The final pick replaced by the oracle: the candidate with the best IoU with the ground truth
    (the first one on ties, as the top-k oracle metric takes it)."""

    def pick(self, selection, cues):
        if cues.target is None:
            raise ValueError("the oracle pick needs the ground truth (ImageSample.targets)")
        cands = selection.candidates
        inter, union = intersection_union(cues.masks[cands], cues.target.expand(len(cands), -1, -1))
        iou = iou_from_counts(inter, union)
        return cands[int(torch.argmax(iou))], iou.tolist()


def _predict(model, datamodule, tmp_path):
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path))
    return [p for batch in trainer.predict(model, datamodule=datamodule) for p in batch]


@pytest.fixture(params=["toy", "demo"])
def world(request, tiny_config, toy_root, tmp_path_factory):
    """(name, model factory, datamodule factory): the tiny random CLIP on the toy dataset with ground-truth
    proposals, or the demo CLIP on 12 demo images with their stored (distractor-laden) proposals."""
    if request.param == "toy":
        return ("toy", lambda cls, **kw: _model(tiny_config, cls, **kw),
                lambda: ReferDataModule(str(toy_root), split="val", batch_size=2))
    root = tmp_path_factory.mktemp("demo-data")
    return ("demo", lambda cls, **kw: cls.from_preset("demo", proposer=StoredProposals(root / "proposals"), **kw),
            lambda: DemoReferDataModule(str(root), num_images=12, batch_size=2))


def test_replacing_the_pick_by_the_oracle_gives_the_top3_oracle_metric(world, tmp_path):
    name, make_model, make_data = world
    normal = make_model(CoPatch)
    normal_preds = _predict(normal, make_data(), tmp_path / "normal")

    # With keep_last_cluster the candidates are the oracle's pool [g, b_1, b_2, b_3]; by default the
    # reference cuts them to [g, b_1, b_2], which leaves b_3 out of the pick's reach.
    oracle = make_model(OraclePick, switches=Switches(keep_last_cluster=True))
    oracle_preds = _predict(oracle, make_data(), tmp_path / "oracle")
    assert all(p.candidates == p.extras["oracle_pool"] for p in oracle_preds)
    assert oracle.results["mIoU"] == normal.results["oracle_mIoU"]
    assert oracle.results["oIoU"] == normal.results["oracle_oIoU"]
    assert [p.iou for p in oracle_preds] == [p.oracle_iou for p in normal_preds]

    # Default candidates: the oracle over [g, b_1, b_2], between the normal pick and the top-3 oracle.
    cut = make_model(OraclePick)
    cut_preds = _predict(cut, make_data(), tmp_path / "cut")
    assert normal.results["mIoU"] <= cut.results["mIoU"] <= normal.results["oracle_mIoU"]
    assert all(n.iou <= c.iou <= n.oracle_iou for n, c in zip(normal_preds, cut_preds))
    if name == "demo":  # there b_3 matters: 66.6 vs 71.5 mIoU on these 12 images (50 expressions)
        assert cut.results["mIoU"] < normal.results["oracle_mIoU"]


def test_the_oracle_pick_without_ground_truth_says_what_it_needs(tiny_config, toy_root):
    sample = _sample(toy_root)
    sample.targets = None
    with pytest.raises(ValueError, match="ground truth"):
        _model(tiny_config, OraclePick).predict_step([sample])
