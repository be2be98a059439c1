"""Batches of images that share a model input size: what makes a batching proposer's batches full.

Mask2Former's default `batching="same_size"` (`copatch.mask2former`) runs only the images of a batch
whose padded model input has the same size through the model together, so that no image sees more
padding than when run alone. COCO images come in many sizes (640 on the long side, the short side
varying), and at Mask2Former's 800 x 1333 resize each short side gives its own padded input, so a
batch of 4 in dataset order is mostly 1-2 images per forward. `SizeGroupedBatchSampler` fills batches with images
of one key (the padded input size), so the proposer gets full batches.

- Deterministic: batches depend only on the order of the indices and their keys. Indices are taken
  in the order the sampler gives them; each key keeps a batch being filled; a batch goes out when it
  holds `batch_size` images, and the partly filled ones go out at the end, in the order their keys
  first appeared. Every image is in exactly one batch.
- Several processes (DDP): each rank batches a disjoint share of the images, and the shares together
  hold every image exactly once (no padding, no repeats: every expression is counted once in the
  metrics). Under Lightning's `Trainer.predict` with `use_distributed_sampler=True` (the default),
  Lightning hands each rank its share as an `UnrepeatedDistributedSampler` (a `DistributedSampler`)
  through the `sampler` argument, and this sampler batches that share as it is. With any other
  sampler (`use_distributed_sampler=False`, or a DataLoader of your own) it takes the share itself
  from `num_replicas` and `rank`: the indices `rank, rank + num_replicas, ...` of the sampler's order,
  which is the share Lightning's sampler gives.

Keys are known without reading an image: the DataModules know each image's height and width from the
annotation files (`SampleDataModule.group_by_size`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence

from torch.utils.data import BatchSampler, DistributedSampler, Sampler

__all__ = ["SizeGroupedBatchSampler", "group_batches"]


def group_batches(indices: Iterable[int], keys: Sequence[Hashable], batch_size: int) -> list[list[int]]:
    """`indices` in batches of at most `batch_size` whose `keys[i]` are all the same (see the module
    docstring for the order); each index once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    filling: dict[Hashable, list[int]] = {}
    batches: list[list[int]] = []
    for index in indices:
        batch = filling.setdefault(keys[index], [])
        batch.append(index)
        if len(batch) == batch_size:
            batches.append(batch)
            filling[keys[index]] = []
    batches.extend(batch for batch in filling.values() if batch)
    return batches


class SizeGroupedBatchSampler(BatchSampler):
    """Batches of indices whose keys are equal (the module docstring says which and in what order).

    Args:
        sampler: the indices to batch, in order (Lightning replaces it with each rank's share under
            DDP; the argument keeps this name so that it can).
        batch_size: images per batch at most.
        drop_last: must be False: every image is predicted (Lightning passes False for predict).
        keys: `keys[i]` is the group of dataset index `i` (e.g. the padded model input `(Hp, Wp)`).
        num_replicas, rank: this process's share when `sampler` is not a `DistributedSampler` (which
            is a share already): indices `rank, rank + num_replicas, ...` of the sampler's order.
    """

    def __init__(self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool = False,
                 keys: Sequence[Hashable] = (), num_replicas: int = 1, rank: int = 0) -> None:
        if drop_last:
            raise ValueError("SizeGroupedBatchSampler predicts every image: drop_last must be False")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.sampler, self.batch_size, self.drop_last = sampler, int(batch_size), False
        self.keys, self.num_replicas, self.rank = list(keys), int(num_replicas), int(rank)

    def _indices(self) -> list[int]:
        indices = list(self.sampler)
        if self.num_replicas > 1 and not isinstance(self.sampler, DistributedSampler):
            indices = indices[self.rank::self.num_replicas]
        return indices

    def batches(self) -> list[list[int]]:
        """This process's batches, in order."""
        return group_batches(self._indices(), self.keys, self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())
