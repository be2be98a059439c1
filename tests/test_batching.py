"""`copatch.batching` and `group_by_size`: batches of one model input size, every image exactly once,
deterministic, and under DDP (Lightning's injected sampler, or the sampler's own share) each rank a
disjoint share that together cover every image once."""

from __future__ import annotations

import json
import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from lightning.fabric.utilities.data import _replace_dunder_methods
from torch.utils.data import BatchSampler, SequentialSampler

from copatch.batching import SizeGroupedBatchSampler, group_batches
from copatch.datamodules.base import SampleDataModule
from copatch.errors import UserValueError
from copatch.module import CoPatch
from copatch.proposals import Proposals
from copatch.run_state import prediction_files, read_jsonl
from copatch.types import Expression, ImageSample

SIZES = [(40, 56), (48, 64), (40, 56), (56, 40), (48, 64), (40, 56), (40, 60), (48, 64), (40, 56), (56, 40),
         (40, 56), (48, 64), (40, 56)]


def _keys(n: int, kinds: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(kinds) for _ in range(n)]


def _check_partition(batches: list[list[int]], keys, expected: list[int], batch_size: int,
                     partial_per_key: int = 1) -> None:
    flat = [i for b in batches for i in b]
    assert sorted(flat) == sorted(expected) and len(flat) == len(set(flat)), "each index exactly once"
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert all(len({keys[i] for i in b}) == 1 for b in batches), "one key per batch"
    # At most one batch per key (per rank) is not full.
    partial = Counter(keys[b[0]] for b in batches if len(b) < batch_size)
    assert all(v <= partial_per_key for v in partial.values())


@pytest.mark.parametrize("n,kinds,batch_size", [(0, 1, 4), (1, 1, 4), (37, 5, 4), (50, 1, 8), (23, 23, 3)])
def test_group_batches_partition_by_key_and_are_deterministic(n, kinds, batch_size):
    keys = _keys(n, kinds, seed=n)
    batches = group_batches(range(n), keys, batch_size)
    _check_partition(batches, keys, list(range(n)), batch_size)
    assert batches == group_batches(range(n), keys, batch_size)
    # Order: full batches as they fill, then the partial ones in the order their keys first appeared.
    full = [b for b in batches if len(b) == batch_size]
    assert batches[: len(full)] == full and all(b == sorted(b) for b in batches)


def test_group_batches_example():
    keys = ["a", "b", "a", "a", "b", "c", "a"]
    assert group_batches(range(7), keys, 2) == [[0, 2], [1, 4], [3, 6], [5]]
    assert group_batches([6, 5, 4, 3, 2, 1, 0], keys, 3) == [[6, 3, 2], [0], [5], [4, 1]]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [13, 14, 2])
def test_the_samplers_own_shares_cover_every_image_once(world, n):
    keys = _keys(n, 3, seed=world)
    shares = [SizeGroupedBatchSampler(SequentialSampler(range(n)), 4, keys=keys, num_replicas=world,
                                      rank=r).batches() for r in range(world)]
    _check_partition([b for share in shares for b in share], keys, list(range(n)), 4, partial_per_key=world)
    per_rank = [sorted(i for b in share for i in b) for share in shares]
    assert per_rank == [list(range(r, n, world)) for r in range(world)]  # Lightning's unrepeated share
    assert [len(s) for s in shares] == [len(SizeGroupedBatchSampler(range(n), 4, keys=keys, num_replicas=world,
                                                                    rank=r)) for r in range(world)]


def test_a_distributed_sampler_is_a_share_already():
    keys = _keys(14, 3, seed=0)
    given = UnrepeatedDistributedSampler(list(range(14)), num_replicas=3, rank=1, shuffle=False)
    sampler = SizeGroupedBatchSampler(given, 4, keys=keys, num_replicas=3, rank=1)
    assert sorted(i for b in sampler for i in b) == list(range(1, 14, 3))  # not split a second time


def test_bad_arguments():
    with pytest.raises(ValueError, match="drop_last"):
        SizeGroupedBatchSampler(range(3), 2, drop_last=True, keys=[0, 0, 0])
    with pytest.raises(ValueError, match="rank"):
        SizeGroupedBatchSampler(range(3), 2, keys=[0, 0, 0], num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="batch_size"):
        group_batches(range(3), [0, 0, 0], 0)


# ------------------------------------------------------------------------------ the DataModule switch
class Sized(SampleDataModule):
    """Images of `SIZES` with known sizes (`image_sizes`), two expressions each."""

    def __init__(self, sizes=SIZES, **kwargs):
        super().__init__(**kwargs)
        self.sizes = list(sizes)

    def build_dataset(self):
        return SizedDataset(self.sizes)


class SizedDataset(torch.utils.data.Dataset):
    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def image_sizes(self):
        return list(self.sizes)

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(i)
        image = torch.randint(0, 256, (3, *self.sizes[i]), generator=gen, dtype=torch.uint8)
        return ImageSample(i, image, [Expression(2 * i, "the left thing"), Expression(2 * i + 1, "a big thing")])


def _loader_ids(loader) -> list[list[int]]:
    return [[s.image_id for s in batch] for batch in loader]


def _lightning_loader(dm, sampler):
    """What `Trainer.predict` does to the DataLoader: the hook called with BatchSampler arguments recorded,
    then `sampler` injected (Lightning's real `_update_dataloader`, predict mode)."""
    with _replace_dunder_methods(BatchSampler):
        loader = dm.predict_dataloader()
    return _update_dataloader(loader, sampler, mode=RunningStage.PREDICTING)


def test_group_by_size_batches_one_size_and_is_off_by_default():
    plain = Sized(batch_size=3)
    assert _loader_ids(plain.predict_dataloader()) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12]]
    grouped = Sized(batch_size=3, group_by_size=True)
    batches = _loader_ids(grouped.predict_dataloader())
    _check_partition(batches, SIZES, list(range(len(SIZES))), 3)
    assert batches == _loader_ids(Sized(batch_size=3, group_by_size=True).predict_dataloader())


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("lightning_sampler", [True, False], ids=["use_distributed_sampler", "own_share"])
def test_ddp_shares_through_lightnings_injection_cover_every_image_once(world, lightning_sampler):
    ids = []
    for rank in range(world):
        dm = Sized(batch_size=2, group_by_size=True)
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank, lightning_module=None, accelerator=None)
        dm.setup("predict")
        # use_distributed_sampler=True: Lightning's UnrepeatedDistributedSampler; False: the DataLoader's own
        # sequential sampler is put back, and the batch sampler takes its share from world size and rank.
        injected = (UnrepeatedDistributedSampler(dm.dataset, num_replicas=world, rank=rank, shuffle=False)
                    if lightning_sampler else SequentialSampler(dm.dataset))
        loader = _lightning_loader(dm, injected)
        batches = _loader_ids(loader)
        assert all(len({SIZES[i] for i in b}) == 1 for b in batches)
        assert len(loader) == len(batches)
        ids.extend(i for b in batches for i in b)
    assert sorted(ids) == list(range(len(SIZES))), "every image once over all ranks, no padding"


def test_a_dataset_without_sizes_is_a_user_error():
    class NoSizes(SampleDataModule):
        def build_dataset(self):
            return [ImageSample(0, torch.zeros(3, 4, 4, dtype=torch.uint8), [Expression(0, "x")])]

    with pytest.raises(UserValueError, match="image_sizes"):
        NoSizes(group_by_size=True).predict_dataloader()


class PaddingProposer:
    """A batching proposer with Mask2Former's interface for the key (`padded_size`): records each batch."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def padded_size(self, size):
        return (-(-size[0] // 8) * 8, -(-size[1] // 8) * 8)

    def propose_batch(self, images, image_ids=None, prepared=None):
        self.batches.append([self.padded_size(tuple(im.shape[-2:])) for im in images])
        return [self._one(im) for im in images]

    def __call__(self, sample):
        return self._one(sample.image)

    @staticmethod
    def _one(image):
        h, w = image.shape[-2:]
        masks = torch.zeros(3, h, w, dtype=torch.bool)
        masks[0, : h // 2], masks[1, :, : w // 3], masks[2, h // 4:, w // 4:] = True, True, True
        return Proposals(masks)


@pytest.mark.slow
def test_predict_with_group_by_size_gives_the_same_predictions_in_full_batches(tiny_config, tmp_path):
    sizes = SIZES[:9]

    def run(group):
        torch.manual_seed(0)
        proposer = PaddingProposer()
        model = CoPatch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128, proposer=proposer)
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=str(tmp_path / str(group)))
        dm = Sized(sizes, batch_size=3, group_by_size=group)
        preds = [p for b in trainer.predict(model, datamodule=dm) for p in b]
        return {p.expression_id: (p.chosen, p.mask.sum().item()) for p in preds}, proposer.batches

    plain, plain_batches = run(False)
    grouped, grouped_batches = run(True)
    assert grouped == plain and len(grouped) == 2 * len(sizes)
    keys = [PaddingProposer().padded_size(s) for s in sizes]
    assert all(len(set(b)) == 1 for b in grouped_batches)  # one padded input size per proposer call
    assert sorted(k for b in grouped_batches for k in b) == sorted(keys)
    assert len(grouped_batches) < sum(len(set(b)) for b in plain_batches)  # fewer model batches


@pytest.mark.slow
def test_two_process_ddp_with_group_by_size_predicts_every_expression_once(tiny_run_config, reference_run,
                                                                           tmp_path, run_python):
    """A real two-process run (gloo, CPU) with the sampler's own share (`use_distributed_sampler=False`),
    the path where nothing but `group_by_size` keeps the ranks apart."""
    out = tmp_path / "ddp"
    proc = run_python(["-m", "copatch.cli", "predict", "--config", str(tiny_run_config), "--trainer.default_root_dir",
                       str(out), "--trainer.devices", "2", "--trainer.strategy", "ddp",
                       "--trainer.use_distributed_sampler", "false", "--data.init_args.group_by_size", "true"],
                      cwd=tmp_path, timeout=240, what="the two-process DDP run with group_by_size")
    assert proc.returncode == 0, proc.stdout[-3000:]
    per_rank = [[line["id"] for line in read_jsonl(p)] for p in prediction_files(out)]
    assert len(per_rank) == 2 and all(per_rank)
    single = {line["id"]: line for p in prediction_files(reference_run) for line in read_jsonl(p)}
    counts = Counter(i for ids in per_rank for i in ids)
    assert sorted(counts) == sorted(single) and set(counts.values()) == {1}
    ddp = {line["id"]: line for p in prediction_files(out) for line in read_jsonl(p)}
    assert {i: ddp[i]["chosen"] for i in single} == {i: single[i]["chosen"] for i in single}
    assert (json.loads((out / "metrics.json").read_text())["metrics"]
            == json.loads((reference_run / "metrics.json").read_text())["metrics"])
