"""CoPatch.predict_step end to end on the toy REFER dataset, with the tiny random CLIP."""

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from copatch.datamodules.refer import ReferDataModule, ReferDataset
from copatch.module import CoPatch
from copatch.proposals import GroundTruthProposals, Proposals
from copatch.switches import Switches
from copatch.text.parsing import ParserUnavailableError


def _model(tiny_config, **kw):
    torch.manual_seed(0)
    kw.setdefault("proposer", GroundTruthProposals())  # the oracle, by name: there is no default proposer
    return CoPatch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128, **kw)


def _trainer(tmp_path):
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   default_root_dir=str(tmp_path))


def test_predict_gives_one_prediction_per_expression_and_exact_metrics(tiny_config, toy_root, tmp_path):
    model = _model(tiny_config)
    dm = ReferDataModule(str(toy_root), split="val", batch_size=2)
    batches = _trainer(tmp_path).predict(model, datamodule=dm)
    preds = [p for batch in batches for p in batch]
    dataset = ReferDataset(str(toy_root), split="val")
    samples = [dataset[i] for i in range(len(dataset))]
    assert [p.expression_id for p in preds] == [e.id for s in samples for e in s.expressions]

    # Independent recomputation of the metrics from the returned masks (NumPy).
    targets = [t.numpy() for s in samples for t in s.targets]
    inter = np.array([np.logical_and(p.mask.numpy(), t).sum() for p, t in zip(preds, targets)])
    union = np.array([np.logical_or(p.mask.numpy(), t).sum() for p, t in zip(preds, targets)])
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    assert model.results["n"] == len(preds)
    assert model.results["oIoU"] == pytest.approx(100 * inter.sum() / union.sum())
    assert model.results["mIoU"] == pytest.approx(100 * iou.mean())
    assert [p.iou for p in preds] == pytest.approx(list(iou))
    # The oracle over [g, b_1, ..., b_k] can only be as good or better than the pick.
    assert all(p.oracle_iou >= p.iou for p in preds)
    assert model.results["oracle_mIoU"] >= model.results["mIoU"]
    assert (tmp_path / "metrics.json").is_file()
    for p in preds:
        assert p.chosen in p.candidates and p.candidates[0] == p.extras["top1"]
        assert len(p.candidates) <= 3 and p.clusters.shape[-2:] == (4, 4)


class NoProposals:
    def __call__(self, sample):
        h, w = sample.size
        return Proposals(torch.zeros(0, h, w, dtype=torch.bool))


def test_an_image_without_proposals_counts_its_expressions_as_iou_0(tiny_config, toy_root, tmp_path):
    model = _model(tiny_config, proposer=NoProposals())
    dm = ReferDataModule(str(toy_root), split="val", batch_size=2, limit=2)
    preds = [p for b in _trainer(tmp_path).predict(model, datamodule=dm) for p in b]
    assert preds and all(p.chosen == -1 and p.iou == 0.0 and not p.mask.any() for p in preds)
    assert model.results["n"] == len(preds) and model.results["mIoU"] == 0.0


def test_ground_truth_of_the_wrong_size_names_the_image(tiny_config, toy_root):
    sample = ReferDataset(str(toy_root), split="val")[0]
    sample.targets = sample.targets[:, :-1]
    with pytest.raises(ValueError, match=rf"ground-truth masks of image {sample.image_id}.*original resolution"):
        _model(tiny_config).predict_step([sample])


def test_empty_expression_is_a_failure_naming_its_id(tiny_config, toy_root):
    # Only that expression fails (IoU 0); the image's others are predicted (tests/test_bad_input.py: a run).
    sample = ReferDataset(str(toy_root), split="val")[0]
    sample.expressions[0].text = "  "
    preds = _model(tiny_config).predict_step([sample])
    assert [p.expression_id for p in preds] == [e.id for e in sample.expressions]
    assert preds[0].failure["kind"] == "expression" and (preds[0].iou, preds[0].chosen) == (0.0, -1)
    assert f"expression {sample.expressions[0].id!r} of image {sample.image_id!r} is empty" in preds[0].failure["error"]
    assert all(p.failure is None and p.chosen >= 0 for p in preds[1:])


def test_missing_stanza_resources_name_the_directory(tiny_config, toy_root, tmp_path):
    model = _model(tiny_config, switches=Switches(parser="stanza"), stanza_resources=str(tmp_path))
    sample = ReferDataset(str(toy_root), split="val")[0]
    with pytest.raises(ParserUnavailableError, match=str(tmp_path)):
        model.predict_step([sample])


def test_paper_preset_runs(tiny_config, toy_root):
    import dataclasses

    sample = ReferDataset(str(toy_root), split="val")[0]
    paper = _model(tiny_config, switches=dataclasses.replace(Switches.paper(), parser="spacy"))
    out = paper.predict_step([sample])
    assert [p.expression_id for p in out] == [e.id for e in sample.expressions]
    # keep_last_cluster: the candidates are the whole oracle pool [g, b_1, ..., b_k]
    assert all(p.candidates == p.extras["oracle_pool"] for p in out)


def test_spatial_guidance_pick_is_the_argmax_of_the_mixed_score(tiny_config, toy_root):
    model = _model(tiny_config, alpha=0.7)
    for sample in ReferDataset(str(toy_root), split="val"):
        for p in model.predict_step([sample]):
            sr, sc = torch.tensor(p.extras["sr"]), torch.tensor(p.extras["sc"])
            final = 0.3 * sr + 0.7 * sc
            torch.testing.assert_close(torch.tensor(p.candidate_scores), final)
            assert p.chosen == p.candidates[int(torch.argmax(final))]
            torch.testing.assert_close(sr.sum(), torch.tensor(1.0))  # SR is a softmax over the candidates


def test_ablations(tiny_config, toy_root):
    sample = ReferDataset(str(toy_root), split="val")[1]
    base = _model(tiny_config, switches=Switches(use_comap=False, spatial_guidance=False))
    for p in base.predict_step([sample]):
        scores = torch.tensor(p.candidate_scores)
        assert torch.all(scores[:-1] >= scores[1:])  # top-k by global-local score, best first
        assert p.chosen == p.candidates[0] and "sr" not in p.extras
    no_neg = _model(tiny_config, switches=Switches(negate_patches=False))
    assert len(no_neg.predict_step([sample])) == len(sample.expressions)


def test_image_work_and_text_encoding_happen_once_per_image(tiny_config, toy_root, monkeypatch):
    import copatch.module as module

    model = _model(tiny_config)
    calls = {"gem": 0, "text": 0, "image": 0}
    real_gem, real_image, real_text = module.gem_patch_features, module.image_features, model.backbone.encode_text

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(module, "gem_patch_features", count("gem", real_gem))
    monkeypatch.setattr(module, "image_features", count("image", real_image))
    monkeypatch.setattr(model.backbone, "encode_text", count("text", real_text))
    sample = next(s for s in ReferDataset(str(toy_root), split="val") if len(s.expressions) > 2)
    model.predict_step([sample])
    assert calls == {"gem": 1, "text": 1, "image": 1}


def test_the_model_is_frozen(tiny_config):
    model = _model(tiny_config)
    assert not any(p.requires_grad for p in model.parameters())


class BatchingProposer:
    """Ground-truth instance masks, with a `propose_batch` that records each call's image ids."""

    def __init__(self):
        self.batches, self.singles = [], 0

    def __call__(self, sample):
        self.singles += 1
        return Proposals(sample.instance_masks)

    def propose_batch(self, images, image_ids, prepared):
        self.batches.append(list(image_ids))
        assert len(prepared) == len(images)
        return [Proposals(self.masks[i]) for i in image_ids]


def test_a_batching_proposer_runs_once_per_batch(tiny_config, toy_root, tmp_path):
    dataset = ReferDataset(str(toy_root), split="val", limit=4)
    proposer = BatchingProposer()
    proposer.masks = {dataset[i].image_id: dataset[i].instance_masks for i in range(len(dataset))}
    model = _model(tiny_config, proposer=proposer)
    dm = ReferDataModule(str(toy_root), split="val", batch_size=3, limit=4)
    batched = [p for b in _trainer(tmp_path).predict(model, datamodule=dm) for p in b]
    ids = [dataset[i].image_id for i in range(4)]
    assert proposer.batches == [ids[:3], ids[3:]] and proposer.singles == 0
    # The same proposals one image at a time (the ground-truth proposer) give the same picks.
    reference = _model(tiny_config)
    single = [p for b in _trainer(tmp_path).predict(reference, datamodule=dm) for p in b]
    assert [p.chosen for p in batched] == [p.chosen for p in single]

    class OwnPropose(CoPatch):  # a subclass that overrides `propose` keeps it, per image
        def propose(self, sample):
            return super().propose(sample)

    proposer.batches = []
    torch.manual_seed(0)
    own = OwnPropose(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128, proposer=proposer)
    _trainer(tmp_path).predict(own, datamodule=dm)
    assert proposer.batches == [] and proposer.singles == 4


def test_parses_are_cached_across_runs(tiny_config, toy_root, tmp_path):
    cache = tmp_path / "parses"
    dm = ReferDataModule(str(toy_root), split="val", batch_size=2, limit=2)
    first = _model(tiny_config, parse_cache_dir=str(cache))
    preds = [p for b in _trainer(tmp_path).predict(first, datamodule=dm) for p in b]
    assert first.parser.misses == len({p.text for p in preds})  # each distinct string parsed once
    assert list(cache.glob("*.jsonl"))
    again = _model(tiny_config, parse_cache_dir=str(cache))
    again_preds = [p for b in _trainer(tmp_path).predict(again, datamodule=dm) for p in b]
    assert again.parser.misses == 0 and again.parser.hits == len(preds)
    assert [p.chosen for p in again_preds] == [p.chosen for p in preds]
    assert [p.extras["noun_phrase"] for p in again_preds] == [p.extras["noun_phrase"] for p in preds]
    # The cache folder does not change what the run computes, so it is not part of its fingerprint.
    assert again.fingerprint()["hparams"] == _model(tiny_config).fingerprint()["hparams"]


def test_clear_caches_starts_cold_and_changes_nothing(tiny_config, toy_root, tmp_path):
    model = _model(tiny_config)
    dm = ReferDataModule(str(toy_root), split="val", batch_size=2, limit=2)
    first = [p for b in _trainer(tmp_path).predict(model, datamodule=dm) for p in b]
    assert len(model.text_cache) > 0 and model.parser.misses > 0
    model.clear_caches()
    assert len(model.text_cache) == 0 and len(model.gem_text_cache) == 0
    assert (model.parser.hits, model.parser.misses) == (0, 0)
    again = [p for b in _trainer(tmp_path).predict(model, datamodule=dm) for p in b]
    assert model.parser.misses == len({p.text for p in first})
    assert [p.candidate_scores for p in again] == [p.candidate_scores for p in first]


def _everything(preds):
    # Every field a prediction records (repr, so that NaN scores compare equal).
    return [repr((p.expression_id, p.chosen, p.candidates, p.candidate_scores, p.clusters.tolist(), p.extras,
                  p.score, p.iou, p.oracle_iou, p.inter, p.union, p.oracle_inter, p.oracle_union))
            + repr(p.mask.tolist()) for p in preds]


class _PerExpression(CoPatch):
    """Overrides `pick` (calling it unchanged), which sends every expression through `select` and `pick`."""

    def pick(self, selection, cues):
        return super().pick(selection, cues)


@pytest.mark.parametrize("switches", [
    Switches(),
    Switches(similarity_norm="channels", clustering="bfs", cluster_order="seed_score", cluster_binarize="half",
             keep_last_cluster=True, box_format="xywh", nan_policy="loses", text_features="context"),
    Switches(use_comap=False), Switches(spatial_guidance=False), Switches(negate_patches=False)])
def test_the_device_path_predicts_what_the_per_expression_stages_predict(tiny_config, toy_root, switches):
    samples = list(ReferDataset(str(toy_root), split="val"))
    fast = _model(tiny_config, switches=switches)
    torch.manual_seed(0)
    slow = _PerExpression(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128, switches=switches,
                          proposer=GroundTruthProposals())
    assert _everything(fast.predict_step(samples)) == _everything(slow.predict_step(samples))


def test_a_batch_of_images_predicts_what_one_image_at_a_time_predicts(tiny_config, toy_root):
    # GEM runs over the images of the batch at once (`gem_together`); the rest per image.
    samples = list(ReferDataset(str(toy_root), split="val"))
    model = _model(tiny_config)
    together = model.predict_step(samples)
    alone = [p for s in samples for p in model.predict_step([s])]
    assert len(samples) > 2 and _everything(together) == _everything(alone)


def test_batched_crops_is_a_switch_that_keeps_the_picks_here(tiny_config, toy_root):
    samples = list(ReferDataset(str(toy_root), split="val"))
    exact = _model(tiny_config).predict_step(samples)
    fast = _model(tiny_config, batched_crops=True).predict_step(samples)
    assert [p.chosen for p in fast] == [p.chosen for p in exact]
    assert _model(tiny_config).hparams.batched_crops is False
