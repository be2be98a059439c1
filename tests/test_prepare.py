"""Image-only preprocessing in DataLoader workers (`copatch.prepare`): same inputs, same predictions."""

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image
from torch.utils.data import DataLoader

from copatch.datamodules.base import collate_samples
from copatch.datamodules.refer import ReferDataModule, ReferDataset
from copatch.gem import GemInput
from copatch.mask2former import Mask2FormerInput
from copatch.module import CoPatch
from copatch.proposals import GroundTruthProposals
from copatch.prepare import SamplePreparer, prepared_input
from copatch.types import Expression, ImageSample


def _sample(h=30, w=50, error=None) -> ImageSample:
    image = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return ImageSample(7, image, [Expression(1, "the dog")], error=error)


def test_steps_compute_the_pil_resizes_and_name_their_settings():
    original = _sample()
    gem, m2f = GemInput(64, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)), Mask2FormerInput(40, 100)
    sample = SamplePreparer((gem, m2f))(original)
    assert original.prepared == {}  # a copy: the dataset's own sample keeps nothing
    assert set(sample.prepared) == {gem.key((30, 50)), "mask2former:40x67"}
    # Independent: PIL on the HWC array.
    pil = Image.fromarray(sample.image.permute(1, 2, 0).numpy())
    expected_gem = np.asarray(pil.resize((64, 64), Image.BICUBIC)).astype(np.float32) / 255
    expected_gem = (expected_gem - [0.5, 0.4, 0.3]) / 0.2
    torch.testing.assert_close(sample.prepared[gem.key((30, 50))],
                               torch.from_numpy(expected_gem.transpose(2, 0, 1)).float(), atol=1e-5, rtol=0)
    expected_m2f = np.asarray(pil.resize((67, 40), Image.BILINEAR)).transpose(2, 0, 1)
    assert torch.equal(sample.prepared["mask2former:40x67"], torch.from_numpy(expected_m2f.copy()))
    # Other settings give other keys, so a stale preparation is never taken for the current one.
    assert GemInput(64, (0.5, 0.4, 0.3), (0.2, 0.2, 0.25)).key((30, 50)) != gem.key((30, 50))
    assert Mask2FormerInput(40, 60).key((30, 50)) != m2f.key((30, 50))


def test_prepared_input_takes_a_prepared_tensor_else_computes():
    sample, step = _sample(), GemInput(32)
    sentinel = torch.full((3, 32, 32), 9.0)
    assert torch.equal(prepared_input(sample, step), step(sample))
    sample.prepared[step.key(sample.size)] = sentinel
    assert prepared_input(sample, step) is sentinel


def test_a_sample_without_its_image_is_left_alone_and_the_preparer_pickles():
    preparer = SamplePreparer((GemInput(32), Mask2FormerInput(40, 100)))
    bad = preparer(_sample(error="missing file"))
    assert bad.prepared == {}
    again = pickle.loads(pickle.dumps(preparer))
    assert again == preparer and bool(again) and not SamplePreparer()


def _model(tiny_config, **kw):
    torch.manual_seed(0)
    kw.setdefault("proposer", GroundTruthProposals())  # the oracle, by name: there is no default proposer
    return CoPatch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128, **kw)


class Spy(CoPatch):
    """Records the prepared keys each image arrives with."""

    seen: list

    def encode_image(self, sample, masks):
        self.seen.append(sorted(sample.prepared))
        return super().encode_image(sample, masks)


def _trainer(tmp_path):
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path))


@pytest.mark.parametrize("workers", [0, 1])
def test_datamodule_workers_prepare_and_predictions_do_not_change(tiny_config, toy_root, tmp_path, workers):
    model = Spy(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128, proposer=GroundTruthProposals())
    model.seen = []
    dm = ReferDataModule(str(toy_root), split="val", batch_size=2, limit=3, num_workers=workers)
    prepared = [p for b in _trainer(tmp_path).predict(model, datamodule=dm) for p in b]
    gem_key = model.gem_input().key((0, 0))
    assert isinstance(dm.sample_transform, SamplePreparer)
    assert model.seen and all(keys == [gem_key] for keys in model.seen)  # made in the collate function

    # The same images through a plain DataLoader (nothing prepared): the module resizes itself.
    model.seen = []
    dataset = ReferDataset(str(toy_root), split="val", limit=3)
    plain = DataLoader(dataset, batch_size=2, collate_fn=collate_samples)
    unprepared = [p for b in _trainer(tmp_path).predict(model, dataloaders=plain) for p in b]
    assert model.seen and all(keys == [] for keys in model.seen)
    assert [p.expression_id for p in prepared] == [p.expression_id for p in unprepared]
    assert [p.chosen for p in prepared] == [p.chosen for p in unprepared]
    assert [p.candidate_scores for p in prepared] == [p.candidate_scores for p in unprepared]


def test_setup_keeps_a_users_own_transform(tiny_config, toy_root, tmp_path):
    def mine(sample):
        return sample

    model = _model(tiny_config)
    dm = ReferDataModule(str(toy_root), split="val", batch_size=2, limit=1)
    dm.sample_transform = mine
    _trainer(tmp_path).predict(model, datamodule=dm)
    assert dm.sample_transform is mine


def test_stored_proposals_decode_in_the_worker_and_a_bad_file_is_left_to_the_main_process(tmp_path):
    from copatch.proposals import PackedProposals, Proposals, StoredProposals

    store = StoredProposals(tmp_path)
    sample = _sample()
    masks = torch.zeros(3, 30, 50, dtype=torch.bool)
    masks[1, 5:9, 7:20] = True
    masks[2, 29, 49] = True  # the last pixel, in the last (half-filled: 1500 = 187 * 8 + 4) byte
    store.write(7, Proposals(masks, torch.tensor([0.1, 0.2, 0.3])))
    step = store.input_step()
    ready = SamplePreparer((step,))(sample).prepared[step.key(sample.size)]
    assert isinstance(ready, PackedProposals) and ready.bits.shape == (3, 188)  # 1500 bits -> 188 bytes
    prepared = dataclasses.replace(sample, prepared={step.key(sample.size): ready})
    loaded = store(prepared)  # unpacked from the worker's bits, no file read
    assert torch.equal(loaded.masks, masks) and torch.equal(loaded.scores, torch.tensor([0.1, 0.2, 0.3]))
    (tmp_path / "7.json").unlink()
    assert torch.equal(store(prepared).masks, masks)
    # A missing file: nothing prepared, and the proposer raises the usual error in the main process.
    other = ImageSample(8, sample.image, sample.expressions)
    assert SamplePreparer((step,))(other).prepared == {}
    with pytest.raises(FileNotFoundError, match="8.json"):
        store(other)
    (tmp_path / "9.json").write_text("{not json")
    assert SamplePreparer((step,))(ImageSample(9, sample.image, sample.expressions)).prepared == {}
    assert StoredProposals(tmp_path, decode_in_workers=False).input_step() is None


def test_a_stored_proposals_subclass_gets_its_own_masks_in_the_worker(tmp_path):
    from copatch.proposals import Proposals, StoredProposals

    class FirstTwo(StoredProposals):
        def load(self, image_id, size=None):
            proposals = super().load(image_id, size)
            return Proposals(proposals.masks[:2])

    masks = torch.rand(5, 30, 50, generator=torch.Generator().manual_seed(0)) > 0.5
    StoredProposals(tmp_path).write(7, Proposals(masks))
    store = FirstTwo(tmp_path)
    sample = _sample()
    in_main = store(sample)
    step = store.input_step()
    assert step.key(sample.size) != StoredProposals(tmp_path).input_step().key(sample.size)
    in_worker = store(SamplePreparer((step,))(sample))
    assert in_main.masks.shape[0] == in_worker.masks.shape[0] == 2
    assert torch.equal(in_main.masks, in_worker.masks)


def test_parses_made_in_the_workers_are_used_and_equal(tiny_config, toy_root, tmp_path):
    """`parse_in_workers`: with a worker process the main process's parser parses nothing, and the
    predictions (parses included) equal those of a model that parses itself."""
    torch.manual_seed(0)
    model = _model(tiny_config, parse_in_workers=True)
    dm = ReferDataModule(str(toy_root), split="val", batch_size=2, limit=3, num_workers=1)
    in_workers = [p for b in _trainer(tmp_path).predict(model, datamodule=dm) for p in b]
    assert model.parser.misses == 0 and model.parser.hits == 0  # the worker's copy did the parsing
    reference = _model(tiny_config)
    dm = ReferDataModule(str(toy_root), split="val", batch_size=2, limit=3)
    in_main = [p for b in _trainer(tmp_path).predict(reference, datamodule=dm) for p in b]
    assert reference.parser.misses > 0
    assert [p.chosen for p in in_workers] == [p.chosen for p in in_main]
    for a, b in zip(in_workers, in_main):
        assert {k: a.extras[k] for k in ("noun_phrase", "context", "relation", "direction")} == \
            {k: b.extras[k] for k in ("noun_phrase", "context", "relation", "direction")}


def test_worker_parses_survive_dropping_expressions_and_a_missing_text_means_parse_again(spacy_parser):
    from copatch.text.parse_cache import CachedParser, ParseInput

    step = ParseInput(CachedParser(spacy_parser))
    sample = ImageSample(1, torch.zeros(3, 8, 8, dtype=torch.uint8),
                         [Expression(1, "the man in red"), Expression(2, "left dog"), Expression(3, "the man in red")])
    prepared = SamplePreparer((step,))(sample)
    expected = spacy_parser.parse([e.text for e in sample.expressions])
    assert step.lookup(prepared) == expected  # tuples of the frozen dataclass rebuilt exactly
    fewer = dataclasses.replace(prepared, expressions=prepared.expressions[1:])  # as a resumed run's `pending`
    assert step.lookup(fewer) == expected[1:]
    other = dataclasses.replace(prepared, expressions=[Expression(4, "a cat")])
    assert step.lookup(other) is None and step.lookup(sample) is None
