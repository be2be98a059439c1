"""CoPatch.predict_step end to end on the toy REFER dataset, with the tiny random CLIP."""

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from copatch.datamodules.refer import ReferDataModule, ReferDataset
from copatch.module import CoPatch
from copatch.proposals import Proposals
from copatch.switches import Switches
from copatch.text.parsing import ParserUnavailableError


def _model(tiny_config, **kw):
    torch.manual_seed(0)
    return CoPatch(clip_config=tiny_config, exit_layer=1, **kw)


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


def test_empty_expression_names_its_id(tiny_config, toy_root):
    sample = ReferDataset(str(toy_root), split="val")[0]
    sample.expressions[0].text = "  "
    with pytest.raises(ValueError, match=rf"expression {sample.expressions[0].id} .* is empty"):
        _model(tiny_config).predict_step([sample])


def test_missing_stanza_resources_name_the_directory(tiny_config, toy_root, tmp_path):
    model = _model(tiny_config, switches=Switches(parser="stanza"), stanza_resources=str(tmp_path))
    sample = ReferDataset(str(toy_root), split="val")[0]
    with pytest.raises(ParserUnavailableError, match=str(tmp_path)):
        model.predict_step([sample])


def test_paper_preset_runs_and_changes_the_path(tiny_config, toy_root):
    sample = ReferDataset(str(toy_root), split="val")[0]
    ref = _model(tiny_config).predict_step([sample])
    paper = _model(tiny_config, switches=Switches.paper().__class__(**{**Switches.paper().__dict__,
                                                                        "parser": "spacy"}))
    out = paper.predict_step([sample])
    assert [p.expression_id for p in out] == [p.expression_id for p in ref]
    assert all(len(p.candidates) == 1 + len(p.extras["oracle_pool"]) - 1 for p in out)


def test_the_model_is_frozen(tiny_config):
    model = _model(tiny_config)
    assert not any(p.requires_grad for p in model.parameters())
