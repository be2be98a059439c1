"""What every copatch DataModule shares: predict-only, batches of `ImageSample`s, per-image
preprocessing in the DataLoader workers.

A batch is a plain `list[ImageSample]`: images differ in size and the model works per image (after
one batched proposal call). The collate function runs in the workers, so it is where the model's
`copatch.prepare.SamplePreparer` (the DataModule's `sample_transform`, which `CoPatch.setup` sets)
does its CPU work: PIL resizes, stored-proposal decoding.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Callable

import lightning as L
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from copatch.batching import SizeGroupedBatchSampler
from copatch.errors import UserValueError
from copatch.resize import reduced_size
from copatch.types import ImageSample

SampleTransform = Callable[[ImageSample], ImageSample]


def collate_samples(batch: list[ImageSample], prepare: SampleTransform | None = None) -> list[ImageSample]:
    """The batch as a list, each sample through `prepare` first (in the worker that built the batch)."""
    return [prepare(sample) for sample in batch] if prepare is not None else list(batch)


def make_collate(prepare: SampleTransform | None) -> Callable[[list[ImageSample]], list[ImageSample]]:
    """A picklable collate function applying `prepare` (worker processes get a pickled copy)."""
    return collate_samples if prepare is None else functools.partial(collate_samples, prepare=prepare)


class SampleDataModule(L.LightningDataModule):
    """Predict-only DataModule over a map-style dataset of `ImageSample`s, built by `build_dataset`.

    Args:
        batch_size: images per batch.
        num_workers: DataLoader worker processes (decoding, resizing, proposal loading).
        group_by_size: batch together only images of one model input size (`copatch.batching`): the
            padded input of the model's proposer when it has one (`padded_size`, Mask2Former), else the
            image size (after `max_side`). Batches are still deterministic and, under DDP, each rank gets
            a disjoint share, every image exactly once. Off by default: batches then follow the dataset
            order. Changes no prediction (a batching proposer gives each image the masks it gets alone).

    Attributes:
        sample_transform: applied to each sample in the collate function (None: nothing); `CoPatch.setup`
            sets it to the model's `sample_preparer()` unless a transform of the user's is there.
    """

    def __init__(self, batch_size: int = 1, num_workers: int = 0, group_by_size: bool = False) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.group_by_size = batch_size, num_workers, group_by_size
        self.dataset: Dataset | None = None
        self.sample_transform: SampleTransform | None = None

    def build_dataset(self) -> Dataset:
        """The dataset of this DataModule's split (read once; `setup` keeps it)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:  # Lightning may call setup more than once
            self.dataset = self.build_dataset()

    def predict_dataloader(self) -> DataLoader:
        # No sampler here: under DDP Lightning injects its UnrepeatedDistributedSampler for predict.
        if self.dataset is None:
            self.setup("predict")
        if self.group_by_size:
            return DataLoader(
                self.dataset,
                batch_sampler=self.size_batch_sampler(),
                num_workers=self.num_workers,
                collate_fn=make_collate(self.sample_transform),
                pin_memory=self._pin_memory(),
            )
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=make_collate(self.sample_transform),
            pin_memory=self._pin_memory(),
        )

    def size_keys(self) -> list[Hashable]:
        """Per dataset index, the size its image goes through the proposer at, from the dataset's
        `image_sizes()` (the annotations' `(H, W)`, no image read): the proposer's padded input
        (`padded_size`) of the size after the model's `max_side` when the trainer's model has them."""
        sizes = getattr(self.dataset, "image_sizes", None)
        if sizes is None:
            raise UserValueError(f"group_by_size needs the image sizes before reading the images, and "
                                 f"{type(self.dataset).__name__} has no image_sizes(): set group_by_size to "
                                 "false, or give the dataset an image_sizes() -> [(H, W), ...] method.")
        trainer = getattr(self, "trainer", None)
        model = trainer.lightning_module if trainer is not None else None
        hparams = getattr(model, "hparams", {}) or {}
        max_side = hparams.get("max_side") if hasattr(hparams, "get") else None
        padded = getattr(getattr(model, "proposer", None), "padded_size", None)
        keys = [reduced_size(size, max_side) for size in sizes()]
        return [tuple(padded(key)) for key in keys] if callable(padded) else keys

    def size_batch_sampler(self) -> SizeGroupedBatchSampler:
        """The `group_by_size` batches: this rank's share when the trainer runs several processes (under
        Lightning's default `use_distributed_sampler`, Lightning hands the share in instead)."""
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return SizeGroupedBatchSampler(SequentialSampler(self.dataset), self.batch_size, drop_last=False,
                                       keys=self.size_keys(), num_replicas=world, rank=rank)

    def _pin_memory(self) -> bool:
        """Pin batches when the trainer runs on CUDA: pinned memory copies to the GPU faster
        (`ImageSample.pin_memory`). Not on a CPU run, even on a machine with a GPU (pinning would
        start a CUDA context there)."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and isinstance(trainer.accelerator, CUDAAccelerator)
