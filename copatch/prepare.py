"""Per-image CPU preprocessing, moved into the DataLoader's workers.

Some per-image inputs cost CPU time in the main process, serially between GPU calls: GEM's
`448 x 448` bicubic input (`copatch.gem.gem_transform`) and Mask2Former's detectron2 resize
(`copatch.mask2former.resize_uint8`), both through PIL because only PIL gives the reference's pixels;
stored proposals (`StoredProposals`: JSON + RLE decoding, ~80 ms an image for 200 masks); and, when
asked (`CoPatch(parse_in_workers=True)`), parsing. Done in the workers, while the GPU works on the
previous batch, they cost the main process nothing.

A `PrepareStep` turns a sample into one such input and names it with a key that holds its settings
(and, where the output depends on it, the image size). `SamplePreparer` runs its steps on every
sample of a batch and stores the results in a copy's `ImageSample.prepared`; a stage looks its own key
up (`find_prepared`, `prepared_input`) and computes the input itself when the key is not there. A
missing preparation or one made with other settings therefore costs time, never changes a result. The
prepared inputs belong to the sample's `image` (and id): code that gives a sample another image must
drop them. A step that fails on bad input (an unreadable proposals file: `OSError` / `ValueError`)
leaves its key out, so that the main process meets the same error where it records it as that image's
failure, instead of the worker ending the run.

`CoPatch.setup` hands `CoPatch.sample_preparer()` to a DataModule that has a `sample_transform`
attribute (the built-in ones); their collate function, which runs in the workers, applies it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from copatch.types import ImageSample


@runtime_checkable
class PrepareStep(Protocol):
    """One image-only input: `key(size)` names it for an `(H, W)` image, calling it on a sample computes it."""

    def key(self, size: tuple[int, int]) -> str: ...

    def __call__(self, sample: ImageSample) -> Any: ...


@dataclass(frozen=True)
class SamplePreparer:
    """Picklable (for worker processes) list of steps applied to each sample.

    A sample whose image could not be loaded (`error` set) is left alone: the module records it as a
    failure without looking at any input.
    """

    steps: tuple[PrepareStep, ...] = ()

    def __call__(self, sample: ImageSample) -> ImageSample:
        """A copy of `sample` with the steps' inputs added to its `prepared`; `sample` is not changed
        (an in-memory dataset would otherwise keep every prepared input for good)."""
        if sample.error is not None or not self.steps:
            return sample
        prepared = dict(sample.prepared)
        for step in self.steps:
            try:
                prepared[step.key(sample.size)] = step(sample)
            except (OSError, ValueError):
                pass  # the main process meets the error again, and records it for this image
        return dataclasses.replace(sample, prepared=prepared)

    def __bool__(self) -> bool:
        return bool(self.steps)


def find_prepared(sample: ImageSample, step: PrepareStep) -> Any | None:
    """What a worker prepared for `sample` with `step`'s settings, or None."""
    return sample.prepared.get(step.key(sample.size))


def prepared_input(sample: ImageSample, step: PrepareStep) -> Any:
    """`step`'s input for `sample`: the one prepared in a worker if there is one, else computed now."""
    found = find_prepared(sample, step)
    return found if found is not None else step(sample)
