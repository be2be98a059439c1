"""`ModelProposer`: what the proposers that run a network (Mask2Former, SAM) share.

A subclass provides `_run(images, resized) -> list[Proposals]` (the network and its post-processing over
a group of images), `input_step()` (the resize a DataLoader worker may do ahead, or None),
`_proposal_cache()` (a `copatch.proposal_cache.ProposalCache` or None), a `pixel_mean` buffer (which
tells the device) and `forward_dtype`; it may override `_groups` to choose which images run together.
This class does the rest alike for both: the input checks, cache lookups and writes, always-eval mode,
and the precision the network runs in.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from copatch.errors import UserValueError
from copatch.proposals import Proposals
from copatch.types import ImageSample


def check_batch(images: Sequence[Tensor], image_ids: Sequence[int | str] | None,
                prepared: Sequence[Mapping[str, Any]] | None) -> None:
    """Refuse images that are not `[3, H, W] uint8` with pixels, and id / prepared lists of another length."""
    for i, image in enumerate(images):
        name = f"image {image_ids[i]!r}" if image_ids is not None else f"image {i}"
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise UserValueError(f"{name} must be a [3, H, W] uint8 RGB tensor, got {tuple(image.shape)} {image.dtype}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise UserValueError(f"{name} is empty: {tuple(image.shape)}")
    if image_ids is not None and len(image_ids) != len(images):
        raise UserValueError(f"{len(images)} images but {len(image_ids)} image ids")
    if prepared is not None and len(prepared) != len(images):
        raise UserValueError(f"{len(images)} images but {len(prepared)} prepared inputs")


class ModelProposer(nn.Module):
    """Base of the network proposers; see the module docstring for what a subclass provides."""

    forward_dtype: torch.dtype | None

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def train(self, mode: bool = True) -> "ModelProposer":
        # Always eval: no dropout or drop-path randomness in the masks (Mask2Former's Swin has
        # drop-path 0.3 in the reference config). Lightning calls `.train()` on the host module.
        return super().train(False)

    def __call__(self, sample: ImageSample) -> Proposals:
        # Spelled out (nn.Module's is `*args, **kwargs`) so that jsonargparse sees the `MaskProposer`
        # protocol when a config names the class as `proposer`.
        return super().__call__(sample)

    def forward(self, sample: ImageSample) -> Proposals:
        """Proposals of one image at its original size (`propose_batch` of one)."""
        return self.propose_batch([sample.image], [sample.image_id], [sample.prepared])[0]

    def propose_batch(
        self, images: Sequence[Tensor], image_ids: Sequence[int | str] | None = None,
        prepared: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Proposals]:
        """Proposals of several images, those `_groups` puts together run through the network at once.

        Args:
            images: `B` tensors `[3, H_b, W_b] uint8` RGB, sizes may differ.
            image_ids: the images' dataset ids; needed for the cache (ignored without one).
            prepared: per image, `ImageSample.prepared`: a resize made in a DataLoader worker
                (`input_step`) is used instead of resizing here.

        Returns:
            `B` `Proposals`, each `[N_b, H_b, W_b]` bool (+ `[N_b]` scores), on its image's device.
        """
        images = list(images)
        check_batch(images, image_ids, prepared)
        cache = self._proposal_cache() if image_ids is not None else None
        results: list[Proposals | None] = [None] * len(images)
        todo = []
        for i, image in enumerate(images):
            # None on a miss, and for an entry made from another image with this id.
            found = cache.load(image_ids[i], image) if cache is not None else None
            if found is not None:
                results[i] = self._to(found, image.device)
            else:
                todo.append(i)
        step = self.input_step()
        for group in self._groups(images, todo):
            resized = [prepared[i].get(step.key(tuple(images[i].shape[-2:])))
                       if prepared is not None and step is not None else None for i in group]
            for i, proposals in zip(group, self._run([images[i] for i in group], resized)):
                if cache is not None:
                    cache.save(image_ids[i], images[i], proposals)
                results[i] = self._to(proposals, images[i].device)
        return results  # type: ignore[return-value]

    def _groups(self, images: Sequence[Tensor], todo: list[int]) -> list[list[int]]:
        """Which of the images `todo` run through the network together: all at once by default."""
        return [todo] if todo else []

    def _proposal_cache(self) -> Any:
        return None

    def _autocast(self) -> Any:
        device_type = self.device.type
        if self.forward_dtype is None or self.forward_dtype == torch.float32:
            # Float32, as the reference runs: shut off an outer autocast (e.g. Lightning "16-mixed").
            if device_type in ("cuda", "cpu"):
                return torch.autocast(device_type, enabled=False)
            return nullcontext()
        return torch.autocast(device_type, dtype=self.forward_dtype)

    @staticmethod
    def _to(proposals: Proposals, device: torch.device) -> Proposals:
        scores = None if proposals.scores is None else proposals.scores.to(device)
        return Proposals(masks=proposals.masks.to(device), scores=scores)
