"""`SampleDataModule`, the base of the built-in DataModules: the dataset built once, batches as lists,
the sample transform applied in the collate function (also in worker processes), pinning on CUDA only."""

from types import SimpleNamespace

import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

from copatch.datamodules.base import SampleDataModule, collate_samples, make_collate
from copatch.types import Expression, ImageSample


def _samples(n: int) -> list[ImageSample]:
    return [ImageSample(i, torch.full((3, 4, 5), i, dtype=torch.uint8), [Expression(i, f"thing {i}")])
            for i in range(n)]


class Listed(SampleDataModule):
    def __init__(self, samples, **kwargs):
        super().__init__(**kwargs)
        self.samples, self.builds = samples, 0

    def build_dataset(self):
        self.builds += 1
        return self.samples


def mark(sample: ImageSample) -> ImageSample:  # module level: picklable for worker processes
    return ImageSample(sample.image_id, sample.image, sample.expressions, prepared={"seen": torch.tensor(1)})


def test_dataset_is_built_once_and_batches_are_lists_in_order():
    dm = Listed(_samples(5), batch_size=2)
    dm.setup("predict")
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert dm.builds == 1
    assert [[s.image_id for s in b] for b in batches] == [[0, 1], [2, 3], [4]]
    assert all(isinstance(b, list) for b in batches)
    assert collate_samples(batches[0]) == batches[0] and make_collate(None) is collate_samples


def test_the_sample_transform_runs_in_the_collate_function_of_the_workers():
    dm = Listed(_samples(3), batch_size=2, num_workers=1)
    dm.sample_transform = mark
    batches = list(dm.predict_dataloader())
    assert [s.prepared["seen"].item() for b in batches for s in b] == [1, 1, 1]
    assert all(s.prepared == {} for s in dm.samples)  # the dataset's own samples are untouched


def test_pins_only_for_a_cuda_trainer():
    dm = Listed(_samples(1))
    assert dm.predict_dataloader().pin_memory is False  # no trainer
    dm.trainer = SimpleNamespace(accelerator=CPUAccelerator())
    assert dm.predict_dataloader().pin_memory is False
    dm.trainer = SimpleNamespace(accelerator=CUDAAccelerator())
    assert dm.predict_dataloader().pin_memory is True
