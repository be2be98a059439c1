"""Throughput of copatch's `Trainer.predict` path against the reference code's loop structure.

Both paths run the same stages of the same `CoPatch` module on the same inputs, so they must pick the
same masks (checked, in fp32); what differs is the work they repeat:

- `--mode reference` (the authors' loop): one referred object at a time, batch 1, fp32. For every
  object it reloads (or recomputes) the proposals, recomputes every image feature and takes the boxes
  in a Python loop with `.item()` syncs; for every sentence it parses the sentence four times (the
  reference calls spaCy about eight times per sentence; our parser does two passes per call),
  encodes its texts unbatched and uncached, reruns GEM, and loops over the proposals at full
  resolution for the cluster IoUs (k x N) and the spatial coherence (N), one `.item()` per number.
- `--mode copatch`: `Trainer.predict` over images: image features once per image, one batched text
  call per image with a string cache, one parse per expression, GEM image features once per image.

Synthetic inputs: random images of `--size`, `--expressions` per image grouped into objects of
about 2.8 sentences (RefCOCO: 2.5 objects and 7 sentences per image). Proposals (`--proposer`):
`stored`, `--proposals` Mask2Former-like masks per image (blobs, near-duplicates and empty masks) in
a `StoredProposals` folder; or `mask2former`, a random-weight Mask2Former run on the fly (`--m2f
swin-large`: the reference's Swin-L, 200 queries, 800 x 1333 input; `--m2f tiny` for CPU smoke runs).
Random weights: speed does not depend on the weights' values.

    python benchmarks/throughput.py --device cpu --model copatch-tiny --images 4
    python benchmarks/throughput.py --device cuda --model ViT-B-16-quickgelu --images 50 --bf16
    python benchmarks/throughput.py --device cuda --model ViT-B-16-quickgelu --images 50 --bf16 \
        --proposer mask2former --m2f swin-large

Each mode's peak memory is its own: GPU `max_memory_allocated` (reset before each mode) or the peak
CPU RSS of the main process sampled during the mode (DataLoader workers, `--workers`, not counted).

`--cache-dir DIR` (with `--proposer mask2former`) builds the proposer with a proposal cache, as a first
run over a dataset would: every copatch mode writes all its images' entries into a fresh folder under
DIR (so it computes and writes them, never reads them back), through the background writer
(`--cache-writes inline` writes them in the main process instead, for comparison); the time includes
waiting for the last writes at the end of the run. The reference mode runs without the cache.
`--compile` adds a `copatch-bf16-compile` mode (needs `--bf16` and `--proposer mask2former`): bf16 with
Mask2Former's forward under `torch.compile` (`--compile-backend`, default inductor), warmed up on the
batch shapes of the timed run. It is where compiling helps: a fixed-shape convolution and attention
stack; the CLIP side runs crops of a varying count per image and stays eager. A compile failure is
recorded (`--json`) and the other modes stand. `--json OUT` writes the results (rewritten after each
mode, so an interrupted run keeps what it finished; `benchmarks/gpu_table.py` makes the table).
`--profile` prints the torch profiler's time per stage and top operators of the copatch mode.

Speed is measured here, never in unit tests; the CPU smoke run in the test suite only checks that both
paths run and agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402

from copatch.datamodules.base import SampleDataModule  # noqa: E402
from copatch.module import CoPatch  # noqa: E402
from copatch.proposals import Proposals, StoredProposals  # noqa: E402
from copatch.types import Expression, ImageSample  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
THINGS = ["man", "woman", "dog", "car", "chair", "umbrella", "cup"]
TAILS = ["", " on the left", " on the right", " behind the car", " next to the woman", " in the middle",
         " above the table", " bigger than the dog"]


def synthetic_samples(num_images: int, expressions: int, proposals: int, size: tuple[int, int],
                      store: StoredProposals, seed: int = 0) -> list[ImageSample]:
    """Random images, their expressions (grouped by `ref_id`) and stored blob proposals (also the targets)."""
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


def mask2former_config(name: str, queries: int = 200):
    """A `transformers.Mask2FormerConfig`: the reference's Swin-L COCO-panoptic shape, or a tiny one; `queries`
    proposals per image (the reference's 200)."""
    from transformers import Mask2FormerConfig, SwinConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if name == "swin-large":  # facebook/mask2former-swin-large-coco-panoptic: Swin-L 384, 200 queries, 133 classes
        swin = SwinConfig(image_size=384, embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48],
                          window_size=12, drop_path_rate=0.3, out_features=stages)
        return Mask2FormerConfig(backbone_config=swin, num_queries=queries, num_labels=133)
    swin = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
                      out_features=stages, drop_path_rate=0.0)
    return Mask2FormerConfig(backbone_config=swin, num_queries=queries, hidden_dim=32, feature_size=32,
                             mask_feature_size=32, encoder_feedforward_dim=16, dim_feedforward=16,
                             encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_labels=5)


class ListDataModule(SampleDataModule):
    """The samples as a predict DataModule; like the built-in ones it takes the model's `sample_transform`."""

    def __init__(self, samples: list[ImageSample], batch_size: int, num_workers: int) -> None:
        super().__init__(batch_size, num_workers)
        self.samples = samples

    def build_dataset(self) -> list[ImageSample]:
        return self.samples


@contextmanager
def peak_memory(device: str) -> Iterator[dict]:
    """Peak memory of the enclosed work: GPU `max_memory_allocated`, or the CPU RSS sampled every 5 ms."""
    out: dict = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["peak"] = f"{out['peak_bytes'] / 2**30:.2f} GiB GPU"
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    peak, done = [rss()], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()
        out["peak_bytes"] = max(peak[0], rss())
        out["peak"] = f"{out['peak_bytes'] / 2**30:.2f} GiB RSS"


def run_copatch(model: CoPatch, samples: list[ImageSample], args: argparse.Namespace, precision: str) -> dict:
    trainer = Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=precision,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tempfile.mkdtemp())
    model.clear_caches()  # every mode starts cold
    fresh_cache(model.proposer, args)
    dm = ListDataModule(samples, args.batch_size, args.workers)
    with peak_memory(args.device) as memory:
        start = time.perf_counter()
        batches = trainer.predict(model, datamodule=dm)
        _sync(args.device)
        elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "picks": {p.expression_id: p.chosen for b in batches for p in b}, **memory}


@torch.no_grad()
def run_reference(model: CoPatch, samples: list[ImageSample], args: argparse.Namespace) -> dict:
    """The reference loop's structure, on the module's own stages (fp32, batch 1, nothing cached)."""
    model = model.to(args.device).eval()
    model.clear_caches()  # every mode starts cold
    cache = getattr(model.proposer, "cache", None)
    if cache is not None:  # the reference loop runs without the proposal cache
        model.proposer.cache = None
    picks = {}
    with peak_memory(args.device) as memory:
        start = time.perf_counter()
        _reference_loop(model, samples, args, picks)
        _sync(args.device)
        elapsed = time.perf_counter() - start
    if cache is not None:
        model.proposer.cache = cache
    return {"seconds": elapsed, "picks": picks, **memory}


def fresh_cache(proposer, args: argparse.Namespace) -> None:
    """With `--cache-dir`: point the proposer's cache at a new, empty folder (each run computes and writes
    every entry; background or inline writes as `--cache-writes` says)."""
    if getattr(args, "cache_dir", None) is None or getattr(proposer, "cache", None) is None:
        return
    from copatch.proposal_cache import ProposalCache

    folder = tempfile.mkdtemp(prefix="run-", dir=args.cache_dir)
    proposer.cache_dir = folder
    proposer.cache = ProposalCache(folder, proposer.settings(), background=args.cache_writes == "background")


def card(device: str) -> str:
    """The accelerator's name (GPU), or the CPU's model and core count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU, {os.cpu_count()} cores ({name})"


def write_json(path: str | None, args: argparse.Namespace, results: dict) -> None:
    """The results as JSON (atomic rewrite): the setup, and per mode its speed, memory and picks."""
    if not path:
        return
    n_expr, ref = args.images * args.expressions, results.get("reference")
    fp32 = results.get("copatch")
    ours, theirs = args.mode in ("both", "copatch"), args.mode in ("both", "reference")
    planned = [name for name, wanted in (("copatch", ours), ("copatch-bf16", ours and args.bf16),
                                         ("reference", theirs), ("copatch-bf16-compile", ours and args.compile))
               if wanted]
    modes = {}
    for name, r in results.items():
        if name == "profile":
            continue
        if "error" in r:
            modes[name] = {"error": r["error"]}
            continue
        row = {"seconds": r["seconds"], "expressions_per_s": n_expr / r["seconds"],
               "images_per_s": args.images / r["seconds"], "peak_memory_bytes": r["peak_bytes"],
               "peak_memory": r["peak"]}
        if ref is not None and name != "reference":
            row["speedup_vs_reference"] = ref["seconds"] / r["seconds"]
        # fp32 copatch against the reference loop; other modes against copatch fp32.
        against = ref if name == "copatch" else fp32 if name != "reference" else None
        if against is not None and "picks" in against:
            row["same_picks"] = sum(against["picks"].get(k) == v for k, v in r["picks"].items())
            row["picks_compared_with"] = "reference" if name == "copatch" else "copatch"
        modes[name] = row
    record = {"card": card(args.device), "device": args.device, "torch": torch.__version__,
              "setup": {"clip": args.model, "proposer": args.proposer,
                        "proposals": (f"{args.m2f}, {args.m2f_queries} queries" if args.proposer == "mask2former"
                                      else args.proposals),
                        "images": args.images, "expressions": n_expr, "size": args.size,
                        "batch_size": args.batch_size, "workers": args.workers,
                        "cache": None if args.cache_dir is None else args.cache_writes,
                        "compile_backend": args.compile_backend if args.compile else None},
              "planned": planned, "modes": modes}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def run_compiled(model: CoPatch, samples: list[ImageSample], args: argparse.Namespace) -> dict:
    """bf16 with Mask2Former's forward compiled, warmed up on the timed run's batch shapes; the failure as
    `{"error": ...}` instead of stopping the benchmark."""
    module = model.proposer.model
    eager = module.forward
    try:
        module.forward = torch.compile(eager, backend=args.compile_backend)
        warm = samples[: args.batch_size + len(samples) % args.batch_size]  # a full batch and the last one
        run_copatch(model, warm, args, "bf16-mixed")
        return run_copatch(model, samples, args, "bf16-mixed")
    except Exception as err:  # noqa: BLE001 - recorded in the results, the other modes stand
        return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"}
    finally:
        module.forward = eager


def _loop_boxes(masks: torch.Tensor) -> torch.Tensor:
    """The reference's `masks_to_boxes`: a Python loop over the masks, four `.item()` syncs each."""
    boxes = []
    for m in masks:
        ys, xs = torch.where(m)
        boxes.append([0, 0, 0, 0] if ys.numel() == 0 else
                     [xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()])
    return torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4)


def _loop_ious_and_sc(model: CoPatch, masks: torch.Tensor, clusters: torch.Tensor, heat: torch.Tensor | None,
                      direction: str) -> None:
    """The reference's per-sentence Python loops at full resolution, one `.item()` sync per number:
    IoU of each CoMap cluster with each proposal, and the spatial coherence of every proposal."""
    from copatch.comap import upsample_clusters
    from copatch.selection import binarize_clusters
    from copatch.spatial import coherence_map

    size = tuple(masks.shape[-2:])
    full = binarize_clusters(upsample_clusters(clusters.to(masks.device), size), model.switches.cluster_binarize)
    for c in full:
        for m in masks:
            inter, union = (c & m).sum().item(), (c | m).sum().item()
            _ = inter / union if union else 0.0
    if heat is not None:
        weights = coherence_map(heat, size, direction)
        for m in masks:
            area = m.sum().item()
            _ = (weights * m).sum().item() / area if area else float("nan")


def _reference_loop(model: CoPatch, samples: list[ImageSample], args: argparse.Namespace, picks: dict) -> None:
    from copatch.gem import gem_heatmaps, gem_patch_features

    for sample in samples:
        sample = dataclasses.replace(sample, image=sample.image.to(args.device))
        objects: dict[int, list[Expression]] = {}
        for expr in sample.expressions:
            objects.setdefault(expr.ref_id, []).append(expr)
        for exprs in objects.values():
            masks, feats = model.image_side(sample)  # proposals and image features, per object
            if feats is not None:  # the reference's box loop, per object (checked: same boxes)
                assert torch.equal(_loop_boxes(masks).to(feats.boxes.device), feats.boxes)
            for expr in exprs:
                one = dataclasses.replace(sample, expressions=[expr], targets=None)
                for _ in range(4):  # the reference parses each sentence about eight times, uncached
                    parsed = model.parser.parser.parse([expr.text])
                model.clear_caches()  # text encoded unbatched and uncached, per sentence
                texts = model.encode_text(parsed)
                if feats is not None and model.switches.spatial_guidance:  # GEM again, per sentence
                    pixels = model.gem_input()(sample)
                    feats.gem_patches = gem_patch_features(model.gem_backbone.model, pixels[None].to(args.device),
                                                           model.hparams.gem_depth)[0]
                (pred,) = model.expression_side(one, masks, feats, parsed, texts)
                if feats is not None:
                    heat = None
                    if feats.gem_patches is not None and texts.gem is not None:
                        heat = gem_heatmaps(feats.gem_patches, texts.gem.float(), model.hparams.gem_size)[0]
                    _loop_ious_and_sc(model, masks, pred.clusters, heat, parsed[0].direction)
                picks[expr.id] = pred.chosen


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class LabelledCoPatch(CoPatch):
    """CoPatch with each stage labelled for the torch profiler (`--profile`); computes the same."""


def _labelled(name: str):
    def stage(self, *args, **kwargs):
        with torch.profiler.record_function(f"copatch.{name}"):
            return getattr(CoPatch, name)(self, *args, **kwargs)
    return stage


# `propose`, `encode_image`, `select` and `pick` stay unlabelled: overriding them would turn off the batched
# proposals (`propose_together`), GEM over the batch's images (`gem_together`) and the picks of all an image's
# expressions on the device (`_predict_expressions_on_device`, which stands for `select` + `pick`).
for _name in ("propose_together", "gem_together", "image_side", "parse", "encode_text", "expression_side",
              "comap", "cluster_overlaps", "_predict_expressions_on_device"):
    setattr(LabelledCoPatch, _name, _labelled(_name))


@torch.no_grad()
def spread_mask_logits(proposer, image: torch.Tensor, target_std: float = 2.0) -> None:
    """Make a random-weight Mask2Former give varied masks.

    At random init the mask logits hardly spread (all within a fraction of 0), so every query mask is
    the whole image: one distinct mask, which would make the downstream work (one crop per distinct
    mask) unrealistically small. The logits are linear in the mask-embedding head's last layer, so
    scaling it spreads them: masks become partly on, partly off, and (almost) all distinct.
    """
    head = dict(proposer.model.named_modules())["model.transformer_module.decoder.mask_predictor.mask_embedder"]
    last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    pixels, _ = proposer.preprocess([image])
    std = proposer.model(pixel_values=pixels).masks_queries_logits.std().item()
    last.weight.mul_(target_std / std)
    last.bias.mul_(target_std / std)


def build_model(args: argparse.Namespace, store: StoredProposals, image: torch.Tensor) -> CoPatch:
    proposer = store
    if args.proposer == "mask2former":
        from copatch.mask2former import Mask2FormerProposer

        torch.manual_seed(0)
        proposer = Mask2FormerProposer.from_config(mask2former_config(args.m2f, args.m2f_queries),
                                                   min_size=args.m2f_min_size,
                                                   max_size=args.m2f_max_size, cache_dir=args.cache_dir)
        spread_mask_logits(proposer, image)
    cls = LabelledCoPatch if args.profile else CoPatch
    return cls(clip_model=args.model, proposer=proposer, parse_in_workers=args.parse_in_workers)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="copatch-tiny", help="open_clip name (random weights)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--expressions", type=int, default=7, help="expressions per image")
    parser.add_argument("--proposals", type=int, default=200, help="stored proposals per image")
    parser.add_argument("--proposer", default="stored", choices=["stored", "mask2former"])
    parser.add_argument("--m2f", default="swin-large", choices=["swin-large", "tiny"],
                        help="random-weight Mask2Former for --proposer mask2former")
    parser.add_argument("--m2f-min-size", type=int, default=800, help="Mask2Former test resize, short side")
    parser.add_argument("--m2f-max-size", type=int, default=1333, help="Mask2Former test resize, long side cap")
    parser.add_argument("--m2f-queries", type=int, default=200, help="Mask2Former queries (proposals per image)")
    parser.add_argument("--size", default="480x640", help="HxW")
    parser.add_argument("--batch-size", type=int, default=4, help="images per predict batch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the copatch mode")
    parser.add_argument("--parse-in-workers", action="store_true",
                        help="copatch mode: the DataLoader workers parse (needs --workers >= 1)")
    parser.add_argument("--mode", default="both", choices=["both", "reference", "copatch"])
    parser.add_argument("--bf16", action="store_true", help="also time copatch with bf16 autocast (GPU)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile the copatch mode (fp32) and print its N most expensive operators and stages")
    parser.add_argument("--cache-dir", default=None,
                        help="--proposer mask2former: write a proposal cache under this folder (a fresh one per run)")
    parser.add_argument("--cache-writes", default="background", choices=["background", "inline"],
                        help="with --cache-dir: the background writer (default) or writes in the main process")
    parser.add_argument("--compile", action="store_true",
                        help="also time bf16 with Mask2Former's forward under torch.compile (needs --bf16)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON to OUT")
    args = parser.parse_args(argv)
    if args.cache_dir is not None and args.proposer != "mask2former":
        parser.error("--cache-dir needs --proposer mask2former (stored proposals are a cache already)")
    if args.compile and not (args.bf16 and args.proposer == "mask2former"):
        parser.error("--compile needs --bf16 and --proposer mask2former (it compiles Mask2Former's forward)")
    if args.cache_dir is not None:
        os.makedirs(args.cache_dir, exist_ok=True)
    torch.manual_seed(0)
    h, w = (int(v) for v in args.size.split("x"))
    store = StoredProposals(tempfile.mkdtemp(prefix="copatch-bench-"))
    samples = synthetic_samples(args.images, args.expressions, args.proposals, (h, w), store)
    model = build_model(args, store, samples[0].image)
    n_expr = args.images * args.expressions
    print(f"{args.images} images of {h}x{w}, {n_expr} expressions, {args.proposer} proposals "
          f"({args.m2f if args.proposer == 'mask2former' else args.proposals}), {args.model}, {args.device}")
    results: dict = {}
    write_json(args.json, args, results)  # the setup, before anything is timed
    # Warm-up, untimed: loads spaCy, builds CUDA kernels and autotunes, for both modes alike.
    run_copatch(model, samples[:1], args, "32-true")
    if args.mode in ("both", "copatch"):
        results["copatch"] = run_copatch(model, samples, args, "32-true")
        write_json(args.json, args, results)
        if args.bf16:
            m2f = getattr(model.proposer, "forward_dtype", None)
            if args.proposer == "mask2former":
                model.proposer.forward_dtype = torch.bfloat16
            run_copatch(model, samples[:1], args, "bf16-mixed")  # warm-up of the bf16 kernels
            results["copatch-bf16"] = run_copatch(model, samples, args, "bf16-mixed")
            write_json(args.json, args, results)
            if args.proposer == "mask2former":
                model.proposer.forward_dtype = m2f
    if args.mode in ("both", "reference"):
        results["reference"] = run_reference(model, samples, args)
        write_json(args.json, args, results)
    if args.compile and args.mode in ("both", "copatch"):  # last: a long compile never costs the other modes
        m2f = model.proposer.forward_dtype
        model.proposer.forward_dtype = torch.bfloat16
        results["copatch-bf16-compile"] = run_compiled(model, samples, args)
        model.proposer.forward_dtype = m2f
        write_json(args.json, args, results)
        if "error" in results["copatch-bf16-compile"]:
            print(f"copatch-bf16-compile: {results['copatch-bf16-compile']['error']}")
    for name, r in results.items():
        if "error" in r:
            continue
        print(f"{name:>13}: {n_expr / r['seconds']:8.2f} expressions/s  {args.images / r['seconds']:7.2f} images/s  "
              f"({r['seconds']:.1f} s)  peak memory {r['peak']}")
    if "reference" in results and "copatch" in results:
        for name in ("copatch", "copatch-bf16", "copatch-bf16-compile"):
            if name in results and "error" not in results[name]:
                ratio = results["reference"]["seconds"] / results[name]["seconds"]
                print(f"speed-up of {name} over the reference loop: {ratio:.1f}x")
        if results["reference"]["picks"] != results["copatch"]["picks"]:
            diff = [k for k, v in results["copatch"]["picks"].items() if results["reference"]["picks"][k] != v]
            sys.exit(f"the two paths picked different masks for {len(diff)} expressions, e.g. {diff[:5]}")
        print(f"both paths picked the same mask for all {n_expr} expressions (fp32)")
    for name in ("copatch-bf16", "copatch-bf16-compile"):
        if name in results and "error" not in results[name]:
            same = sum(results[name]["picks"][k] == v for k, v in results["copatch"]["picks"].items())
            print(f"{name} kept the fp32 pick for {same}/{n_expr} expressions")
    if args.profile:
        results["profile"] = profile(model, samples, args)
    return results


def profile(model: CoPatch, samples: list[ImageSample], args: argparse.Namespace) -> str:
    """The torch profiler's view of one fp32 copatch run: the labelled stages and the top operators."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run_copatch(model, samples, args, "32-true")
    key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    events = prof.key_averages()
    stages = [e for e in events if e.key.startswith("copatch.")]
    lines = [f"{'stage':<28} {'calls':>6} {'total ms':>10}"]
    for e in sorted(stages, key=lambda e: -e.cpu_time_total):
        lines.append(f"{e.key:<28} {e.count:>6} {e.cpu_time_total / 1e3:>10.1f}")
    table = "\n".join(lines) + "\n" + events.table(sort_by=f"self_{key}", row_limit=args.profile)
    print(table)
    return table


if __name__ == "__main__":
    main()
