"""Host syncs of the per-expression path (issue 15, item 3).

On the CPU a device-to-host transfer cannot be seen, so the test counts the Python calls that would
be one on a GPU: `Tensor.item`, `.cpu`, `.tolist`, `.numpy`, `__array__` and the conversions `int()`,
`float()`, `bool()`, `operator.index()` of a tensor, during `predict_step` on a batch of two images.
The count must not grow with the number of expressions per image, and stays under a small bound per
image. `comap` is the one stage that runs on the host by design (the clustering walks the grid in
NumPy): it receives a CPU row of the `[E, P]` score map, transferred once per image, so what it does
with that host copy is not counted (its input is checked to be on the CPU).

With CUDA, the expression path runs under `torch.cuda.set_sync_debug_mode("error")`, which raises on
any synchronising call (transfers in either direction without `non_blocking`, `.item()`, ...).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from copatch.module import CoPatch
from copatch.proposals import Proposals
from copatch.types import Expression, ImageSample

COUNTED = ("item", "cpu", "tolist", "numpy", "__array__", "__int__", "__float__", "__bool__", "__index__")
# What one image may cost, whatever its number of expressions (measured: see README, "Performance").
MAX_PER_IMAGE = 14  # measured: 12 (7 on the image side, 3 on the expression side, 2 for the metrics)

TEXTS = ["the red car on the left", "the man next to the dog", "the bigger umbrella",
         "the cup in the middle", "the woman on the right of the chair", "the small dog above the table"]


@contextmanager
def count_host_calls():
    """Counts the calls of `COUNTED` on tensors; `paused[0] > 0` stops counting."""
    counts: Counter = Counter()
    paused = [0]
    originals = {name: getattr(torch.Tensor, name) for name in COUNTED}

    def counted(name, original):
        def call(self, *args, **kwargs):
            if not paused[0]:
                counts[name] += 1
            return original(self, *args, **kwargs)
        return call

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        yield counts, paused
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _model(tiny_config, device="cpu"):
    torch.manual_seed(0)
    model = CoPatch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128)
    return model.to(device)


def _samples(num_expressions: int, device="cpu") -> list[ImageSample]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for image_id, (h, w) in enumerate([(48, 64), (56, 40)]):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        masks = []
        for k in range(12):
            cy, cx = torch.randint(0, h, (1,), generator=g), torch.randint(0, w, (1,), generator=g)
            r = 4 + 3 * (k % 4)
            masks.append((ys - cy) ** 2 + (xs - cx) ** 2 <= r * r)
        masks.append(torch.zeros(h, w, dtype=torch.bool))  # empty, and a duplicate
        masks.append(masks[0].clone())
        masks = torch.stack(masks)
        expressions = [Expression(f"{image_id}-{i}", TEXTS[i % len(TEXTS)]) for i in range(num_expressions)]
        targets = masks[torch.arange(num_expressions) % 12]
        samples.append(ImageSample(str(image_id), image.to(device), expressions, targets=targets.to(device),
                                   proposals=Proposals(masks.to(device))))
    return samples


def _count(model, samples):
    original = model.comap
    state = {"paused": None}

    def host_comap(scores):
        assert scores.device.type == "cpu", "comap gets a host row of the score map"
        paused = state["paused"] or [0]
        paused[0] += 1
        try:
            return original(scores)
        finally:
            paused[0] -= 1

    model.comap = host_comap
    try:
        model.predict_step(samples[:1])  # warm the text caches and lazy builds
        with count_host_calls() as (counts, paused):
            state["paused"] = paused
            preds = model.predict_step(samples)
    finally:
        del model.comap
    return counts, preds


def test_host_syncs_per_image_do_not_grow_with_the_expressions(tiny_config):
    model = _model(tiny_config)
    few, preds_few = _count(model, _samples(2))
    many, preds_many = _count(model, _samples(6))
    assert len(preds_few) == 4 and len(preds_many) == 12
    assert sum(many.values()) == sum(few.values()), (dict(few), dict(many))
    assert sum(many.values()) <= MAX_PER_IMAGE * 2, dict(many)


def test_counting_sees_a_sync(tiny_config):
    with count_host_calls() as (counts, _):
        int(torch.tensor(3))
        torch.tensor([1.0]).tolist()
    assert counts["__int__"] == 1 and counts["tolist"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_sync_on_the_expression_path_cuda(tiny_config, monkeypatch):
    import copatch.module as module

    model = _model(tiny_config, "cuda")
    samples = _samples(6, "cuda")
    model.predict_step(samples)  # warm the caches (text embeddings, direction rows)
    allowed = []
    host = module._host

    def sanctioned(tensor):
        # The one transfer per image of each kind (`_host`) is allowed; nothing else may sync.
        allowed.append(tuple(tensor.shape))
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return host(tensor)
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def guarded(original):
        def call(*args, **kwargs):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return original(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return call

    monkeypatch.setattr(module, "_host", sanctioned)
    model.expression_side = guarded(model.expression_side)
    try:
        preds = model.predict_step(samples)
    finally:
        del model.expression_side
    assert len(preds) == 12 and all(p.mask.device.type == "cpu" for p in preds)
    # Per image: the [E, P] score map and the picks (guarded), the metric counts and the chosen masks.
    assert len(allowed) == 4 * len(samples)
