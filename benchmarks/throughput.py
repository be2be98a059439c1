"""Throughput of copatch's `Trainer.predict` path against the reference code's loop structure.

Both paths run the same stages of the same `CoPatch` module on the same inputs, so they must pick the
same masks (checked, in fp32); what differs is the work they repeat:

- `--mode reference` (the authors' loop): one referred object at a time, batch 1, fp32. For every
  object it reloads the proposals and recomputes every image feature; for every sentence it parses
  the sentence four times (the reference calls spaCy about eight times per sentence; our parser does
  two passes per call), encodes its texts unbatched and uncached, and reruns GEM.
- `--mode copatch`: `Trainer.predict` over images: image features once per image, one batched text
  call per image with a string cache, one parse per expression, GEM image features once per image.

Synthetic inputs: images of `--size` with coloured blobs, `--expressions` per image grouped into
objects of about 2.8 sentences (RefCOCO: 2.5 objects and 7 sentences per image), and `--proposals`
Mask2Former-like masks per image (blobs, near-duplicates and empty masks), stored on disk.

    python benchmarks/throughput.py --device cpu --model copatch-tiny --images 4 --proposals 40
    python benchmarks/throughput.py --device cuda --model ViT-B-16-quickgelu --images 50

Speed is measured here, never in unit tests; the CPU smoke run in the test suite only checks that both
paths run and agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from lightning.pytorch import LightningDataModule, Trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from copatch.module import CoPatch  # noqa: E402
from copatch.proposals import Proposals, StoredProposals  # noqa: E402
from copatch.text.features import TextFeatureCache  # noqa: E402
from copatch.types import Expression, ImageSample  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
THINGS = ["man", "woman", "dog", "car", "chair", "umbrella", "cup"]
TAILS = ["", " on the left", " on the right", " behind the car", " next to the woman", " in the middle",
         " above the table", " bigger than the dog"]


def synthetic_samples(num_images: int, expressions: int, proposals: int, size: tuple[int, int],
                      store: StoredProposals, seed: int = 0) -> list[ImageSample]:
    """Images with blobs, their expressions (grouped by `ref_id`) and stored proposals."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    samples = []
    for image_id in range(num_images):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        masks = []
        for k in range(proposals):
            kind = k % 10
            if kind == 9:  # an empty mask, as Mask2Former gives
                masks.append(torch.zeros(h, w, dtype=torch.bool))
            elif kind == 8 and masks:  # a near-duplicate of the previous mask
                masks.append(masks[-1].roll(1, dims=1))
            else:
                cy, cx = torch.randint(0, h, (1,), generator=g), torch.randint(0, w, (1,), generator=g)
                ry = torch.randint(h // 20, h // 3, (1,), generator=g)
                rx = torch.randint(w // 20, w // 3, (1,), generator=g)
                masks.append(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1)
        masks = torch.stack(masks)
        store.write(image_id, Proposals(masks))
        exprs = []
        for e in range(expressions):
            pick = torch.randint(0, 1000, (3,), generator=g).tolist()
            text = f"the {COLOURS[pick[0] % 6]} {THINGS[pick[1] % 7]}{TAILS[pick[2] % 8]}"
            exprs.append(Expression(id=f"{image_id}-{e}", text=text, ref_id=e * 5 // 14))  # ~2.8 per object
        targets = masks[torch.randint(0, proposals, (expressions,), generator=g)]
        samples.append(ImageSample(image_id, image, exprs, targets=targets, file_name=f"synthetic-{image_id}"))
    return samples


class ListDataModule(LightningDataModule):
    def __init__(self, samples: list[ImageSample], batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.samples, self.batch_size, self.num_workers = samples, batch_size, num_workers

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.samples, batch_size=self.batch_size, num_workers=self.num_workers,
                          collate_fn=list, shuffle=False)


def run_copatch(model: CoPatch, samples: list[ImageSample], args: argparse.Namespace, precision: str) -> dict:
    trainer = Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=precision,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tempfile.mkdtemp())
    model.text_cache.clear()
    model.gem_text_cache.clear()
    dm = ListDataModule(samples, args.batch_size, args.workers)
    start = time.perf_counter()
    batches = trainer.predict(model, datamodule=dm)
    _sync(args.device)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "picks": {p.expression_id: p.chosen for b in batches for p in b}}


@torch.no_grad()
def run_reference(model: CoPatch, samples: list[ImageSample], args: argparse.Namespace) -> dict:
    """The reference loop's structure, on the module's own stages (fp32, batch 1, nothing cached)."""
    from copatch.gem import gem_patch_features, gem_transform

    model = model.to(args.device).eval()
    picks = {}
    start = time.perf_counter()
    for sample in samples:
        sample = dataclasses.replace(sample, image=sample.image.to(args.device))
        objects: dict[int, list[Expression]] = {}
        for expr in sample.expressions:
            objects.setdefault(expr.ref_id, []).append(expr)
        for exprs in objects.values():
            masks, feats = model.image_side(sample)  # proposals and image features, per object
            for expr in exprs:
                one = dataclasses.replace(sample, expressions=[expr], targets=None)
                for _ in range(4):  # the reference parses each sentence about eight times, uncached
                    parsed = model.parser.parser.parse([expr.text])
                model.text_cache.clear()
                model.gem_text_cache.clear()
                texts = model.encode_text(parsed)
                if feats is not None and model.switches.spatial_guidance:  # GEM again, per sentence
                    gem = model.gem_backbone
                    pixels = gem_transform(sample.image, model.hparams.gem_size, gem.clip_mean, gem.clip_std)
                    feats.gem_patches = gem_patch_features(gem.model, pixels[None].to(args.device),
                                                           model.hparams.gem_depth)[0]
                (pred,) = model.expression_side(one, masks, feats, parsed, texts)
                picks[expr.id] = pred.chosen
    _sync(args.device)
    return {"seconds": time.perf_counter() - start, "picks": picks}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="copatch-tiny", help="open_clip name (random weights)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--expressions", type=int, default=7, help="expressions per image")
    parser.add_argument("--proposals", type=int, default=200, help="proposals per image")
    parser.add_argument("--size", default="480x640", help="HxW")
    parser.add_argument("--batch-size", type=int, default=4, help="images per predict batch")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--mode", default="both", choices=["both", "reference", "copatch"])
    parser.add_argument("--bf16", action="store_true", help="also time copatch with bf16 autocast (GPU)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    h, w = (int(v) for v in args.size.split("x"))
    store = StoredProposals(tempfile.mkdtemp(prefix="copatch-bench-"))
    samples = synthetic_samples(args.images, args.expressions, args.proposals, (h, w), store)
    model = CoPatch(clip_model=args.model, proposer=store)
    n_expr = args.images * args.expressions
    results = {}
    if args.mode in ("both", "copatch"):
        results["copatch"] = run_copatch(model, samples, args, "32-true")
        if args.bf16:
            results["copatch-bf16"] = run_copatch(model, samples, args, "bf16-mixed")
    if args.mode in ("both", "reference"):
        results["reference"] = run_reference(model, samples, args)
    for name, r in results.items():
        print(f"{name:>13}: {n_expr / r['seconds']:8.2f} expressions/s  {args.images / r['seconds']:7.2f} images/s  "
              f"({r['seconds']:.1f} s)")
    print(f"peak memory: {peak_memory(args.device)}")
    if "reference" in results and "copatch" in results:
        ratio = results["reference"]["seconds"] / results["copatch"]["seconds"]
        print(f"speed-up of copatch over the reference loop: {ratio:.1f}x")
        if results["reference"]["picks"] != results["copatch"]["picks"]:
            diff = [k for k, v in results["copatch"]["picks"].items() if results["reference"]["picks"][k] != v]
            sys.exit(f"the two paths picked different masks for {len(diff)} expressions, e.g. {diff[:5]}")
        print(f"both paths picked the same mask for all {n_expr} expressions (fp32)")
    if "copatch-bf16" in results:
        same = sum(results["copatch-bf16"]["picks"][k] == v for k, v in results["copatch"]["picks"].items())
        print(f"bf16 autocast kept the fp32 pick for {same}/{n_expr} expressions")
    return results


if __name__ == "__main__":
    main()
