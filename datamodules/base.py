"""What every copatch DataModule shares: predict-only, batches of `ImageSample`s, per-image
preprocessing in the DataLoader workers.

A batch is a plain `list[ImageSample]`: images differ in size and the model works per image (after
one batched proposal call). The collate function runs in the workers, so it is where the model's
`copatch.prepare.SamplePreparer` (the DataModule's `sample_transform`, which `CoPatch.setup` sets)
does its CPU work: PIL resizes, stored-proposal decoding.
"""

from __future__ import annotations

import functools
from typing import Callable

import lightning as L
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, Dataset

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

    Attributes:
        sample_transform: applied to each sample in the collate function (None: nothing); `CoPatch.setup`
            sets it to the model's `sample_preparer()` unless a transform of the user's is there.
    """

    def __init__(self, batch_size: int = 1, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size, self.num_workers = batch_size, num_workers
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
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=make_collate(self.sample_transform),
            pin_memory=self._pin_memory(),
        )

    def _pin_memory(self) -> bool:
        """Pin batches when the trainer runs on CUDA: pinned memory copies to the GPU faster
        (`ImageSample.pin_memory`). Not on a CPU run, even on a machine with a GPU (pinning would
        start a CUDA context there)."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and isinstance(trainer.accelerator, CUDAAccelerator)
