#!/usr/bin/env python
"""Train the demo world's tiny CLIP (`copatch-demo`) on CPU, from a seed, in a wall-clock budget.

    HF_HUB_OFFLINE=1 python scripts/train_demo_clip.py --minutes 15 --seed 0

What it does (following the measurements in the project's demo notes):

- Model: the open_clip config `copatch/model_configs/copatch-demo.json` ("config C": ViT 64 px,
  patch 8, width 128 x 6 layers; text width 128 x 3 layers, context 24; embed 96; standard BPE
  tokenizer), random init after `torch.manual_seed(seed)`.
- Data, rendered on the fly by `copatch.demo.world` at 64 x 64 from a generator seeded by `seed`
  (a seed stream no dataset or evaluation uses):
  - 40% one object at its native scale: `a {size} {colour} {shape}` (size word 80% of the time),
    plus `on the left/right` / `at the top/bottom` half of the time when the position is clear;
  - 15% masked box-crop of one object of a 1-4 object scene: `a {colour} {shape}`; half of the
    crops are square boxes with a 3 px margin on the background colour, half are the pipeline's
    tight boxes stretched to a square on a grey fill;
  - 45% scenes of 2-4 objects: a list of the objects (40%), a relation `a X left of/right of/
    above/below a Y` (30%), or `the X on the left` / `the X at the top` (30%);
  - `--pairs` (default 0.4) of every batch is built as hard-negative pairs that differ in one
    thing only: location/relation (55%: the scene re-rendered mirrored, caption word swapped),
    size (20%: size swapped at the same position), shape (25%).
  Images are normalised with the CLIP mean/std or the ImageNet mean/std (per sample, 50/50),
  since the pipeline can use either.
- Loss `open_clip.loss.ClipLoss()`; AdamW lr 1e-3, betas (0.9, 0.98), eps 1e-6, weight decay
  0.1 on >= 2-D weights except embeddings; 40 linear warm-up steps, then a cosine decay over the
  remaining WALL-CLOCK budget (`--minutes`), so the run ends on time whatever the CPU speed;
  batch 256; bf16 autocast. `--max-steps` instead gives a step-based cosine (exactly
  reproducible; the wall-clock run reproduces the data stream and init, but its step count
  depends on the machine's speed).
- At the end: a quick evaluation on a fixed seed (single objects against 48 prompts, masked
  crops against 24 prompts, masked-crop referring on 128 px evaluation-style scenes), then the
  fp16 state_dict goes to `copatch/weights/copatch-demo.pt` (loadable with
  `open_clip.create_model("copatch-demo", pretrained=path)`) and the settings, steps, loss,
  wall time and evaluation numbers to `copatch/weights/copatch-demo.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import open_clip  # noqa: E402

import copatch.clip_model  # noqa: E402,F401  (registers copatch/model_configs/*.json)
from copatch.demo import world  # noqa: E402
from copatch.demo.world import COLOUR_NAMES, SHAPES, SIZES, Scene, SceneObject  # noqa: E402

MODEL_NAME = "copatch-demo"
TRAIN_STREAM, EVAL_STREAM = 101, 202  # seed streams (the dataset writer uses its own)
SIZE = world.BASE_SIZE
CLIP_MEAN, CLIP_STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# What the pipeline puts outside the mask in a crop: the ImageNet mean's numbers written into the
# normalised image (about RGB 152, 142, 127), or the mean colour (about 123, 117, 104).
CROP_FILLS = ((152, 142, 127), (123, 117, 104))
SWAP = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "above": "below", "below": "above"}


# ------------------------------------------------------------------------------------ captions
def phrase(obj: SceneObject, rng: np.random.Generator, p_size: float, article: str = "a") -> str:
    size = f"{obj.size} " if rng.random() < p_size else ""
    return f"{article} {size}{obj.colour} {obj.shape}"


def article(rng: np.random.Generator) -> str:
    return "a" if rng.random() < 0.5 else "the"


def position_words(obj: SceneObject, scene: Scene) -> list[str]:
    """Where a single object clearly is: among `on the left`, `on the right`, `at the top`, ..."""
    words = []
    if obj.cx < 0.4 * scene.width:
        words.append("on the left")
    elif obj.cx > 0.6 * scene.width:
        words.append("on the right")
    if obj.cy < 0.4 * scene.height:
        words.append("at the top")
    elif obj.cy > 0.6 * scene.height:
        words.append("at the bottom")
    return words


def swap_words(caption: str) -> str:
    return " ".join(SWAP.get(w, w) for w in caption.split())


def is_horizontal(caption: str) -> bool:
    return any(w in ("left", "right") for w in caption.split())


def has_location(caption: str) -> bool:
    return any(w in SWAP for w in caption.split())


def relation_caption(scene: Scene, rng: np.random.Generator) -> str | None:
    """`a X left of a Y` (or right of / above / below) for a pair with a clear offset."""
    options = []
    objs = scene.objects
    for i, a in enumerate(objs):
        for j, b in enumerate(objs):
            if i == j:
                continue
            dx, dy = a.cx - b.cx, a.cy - b.cy
            if abs(dx) >= 0.15 * scene.width:
                options.append((i, j, "left of" if dx < 0 else "right of"))
            if abs(dy) >= 0.15 * scene.height:
                options.append((i, j, "above" if dy < 0 else "below"))
    if not options:
        return None
    i, j, rel = options[int(rng.integers(len(options)))]
    return f"{phrase(objs[i], rng, 0.3)} {rel} {phrase(objs[j], rng, 0.3)}"


def extreme_caption(scene: Scene, rng: np.random.Generator) -> str | None:
    """`the X on the left` / `the X at the top` / ... for an object clearly at that extreme."""
    options = []
    objs = scene.objects
    for words, key, sign in (("on the left", "cx", 1), ("on the right", "cx", -1),
                             ("at the top", "cy", 1), ("at the bottom", "cy", -1)):
        order = sorted(range(len(objs)), key=lambda k: sign * getattr(objs[k], key))
        first, second = objs[order[0]], objs[order[1]]
        if sign * (getattr(second, key) - getattr(first, key)) >= 0.1 * SIZE:
            options.append((order[0], words))
    if not options:
        return None
    k, words = options[int(rng.integers(len(options)))]
    return f"the {objs[k].colour} {objs[k].shape} {words}"


def list_caption(scene: Scene, rng: np.random.Generator) -> str:
    parts = [phrase(scene.objects[k], rng, 0.5) for k in rng.permutation(len(scene.objects))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# ------------------------------------------------------------------------------------- samples
def single_object(rng: np.random.Generator, location: float = 0.5, p_size: float = 0.8) -> tuple[Scene, str]:
    obj = world.sample_object(rng)
    scene = world.make_scene(rng, world.place(rng, [obj], SIZE, SIZE), SIZE, SIZE)
    caption = phrase(scene.objects[0], rng, p_size, article(rng))
    words = position_words(scene.objects[0], scene)
    if words and rng.random() < location:
        caption += " " + words[int(rng.integers(len(words)))]
    return scene, caption


def crop_sample(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    scene = world.sample_scene(rng, SIZE, (1, 4))
    image, masks = world.render(scene)
    k = int(rng.integers(len(scene.objects)))
    obj = scene.objects[k]
    if rng.random() < 0.5:
        crop = world.masked_box_crop(image, masks[k], scene.background, SIZE, margin=3, square=True)
    else:
        fill = CROP_FILLS[int(rng.integers(len(CROP_FILLS)))]
        crop = world.masked_box_crop(image, masks[k], fill, SIZE, square=False)
    return crop, f"{article(rng)} {obj.colour} {obj.shape}"


def scene_sample(rng: np.random.Generator) -> tuple[Scene, str]:
    scene = world.sample_scene(rng, SIZE, (2, 4))
    u = rng.random()
    caption = None
    if u >= 0.4:
        caption = relation_caption(scene, rng) if u < 0.7 else extreme_caption(scene, rng)
    return scene, caption or list_caption(scene, rng)


def location_pair(rng: np.random.Generator) -> list[tuple[np.ndarray, str]]:
    while True:
        kind = rng.random()
        if kind < 1 / 3:
            scene, caption = single_object(rng, location=1.0)
        else:
            scene = world.sample_scene(rng, SIZE, (2, 4))
            caption = relation_caption(scene, rng) if kind < 2 / 3 else extreme_caption(scene, rng)
        if caption and has_location(caption):
            break
    mirrored = world.mirror(scene, horizontal=is_horizontal(caption))
    return [(world.render(scene)[0], caption), (world.render(mirrored)[0], swap_words(caption))]


def attribute_pair(rng: np.random.Generator, what: str) -> list[tuple[np.ndarray, str]]:
    scene, _ = single_object(rng, location=0.0)
    obj = scene.objects[0]
    if what == "size":
        size = "big" if obj.size == "small" else "small"
        other = replace(obj, size=size, r=world.sample_radius(rng, size))
        m = world.BOUND * other.r + 1.0
        other = replace(other, cx=min(max(other.cx, m), SIZE - m), cy=min(max(other.cy, m), SIZE - m))
        p_size = 1.0
    else:
        shape = [s for s in SHAPES if s != obj.shape][int(rng.integers(len(SHAPES) - 1))]
        other = replace(obj, shape=shape)
        p_size = 0.8
    art = article(rng)
    out = []
    for o in (obj, other):
        sub = replace(scene, objects=(o,))
        size_word = f"{o.size} " if p_size == 1.0 or what == "shape" else ""
        out.append((world.render(sub)[0], f"{art} {size_word}{o.colour} {o.shape}"))
    return out


def sample(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    u = rng.random()
    if u < 0.40:
        scene, caption = single_object(rng)
        return world.render(scene)[0], caption
    if u < 0.55:
        return crop_sample(rng)
    scene, caption = scene_sample(rng)
    return world.render(scene)[0], caption


def make_batch(rng: np.random.Generator, batch_size: int, pairs: float) -> tuple[list[np.ndarray], list[str]]:
    items: list[tuple[np.ndarray, str]] = []
    n_pairs = int(round(pairs * batch_size)) // 2
    for _ in range(n_pairs):
        u = rng.random()
        items += location_pair(rng) if u < 0.55 else attribute_pair(rng, "size" if u < 0.75 else "shape")
    while len(items) < batch_size:
        items.append(sample(rng))
    return [im for im, _ in items], [c for _, c in items]


# ------------------------------------------------------------------------------------ tensors
def to_pixels(images: list[np.ndarray], norms: list[int] | None = None) -> torch.Tensor:
    """uint8 HWC images (64 px) -> `[B, 3, 64, 64]` float32; norm 0 = CLIP, 1 = ImageNet mean/std."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    means = torch.tensor([CLIP_MEAN, IMAGENET_MEAN])
    stds = torch.tensor([CLIP_STD, IMAGENET_STD])
    idx = torch.zeros(len(images), dtype=torch.long) if norms is None else torch.as_tensor(norms)
    return (x - means[idx][:, :, None, None]) / stds[idx][:, :, None, None]


class Tokens:
    """Caches tokenised captions (the caption set is small)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            for c, t in zip(missing, self.tokenizer(missing)):
                self.cache[c] = t
        return torch.stack([self.cache[c] for c in captions])


# ------------------------------------------------------------------------------------ training
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and "embedding" not in name and "logit_scale" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, elapsed: float, warmup_end: float | None, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.max_steps:
        progress = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    else:
        budget = args.minutes * 60.0
        progress = (elapsed - warmup_end) / max(1e-6, budget - warmup_end)
    return 0.5 * args.lr * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


# ---------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def encode_images(model, images: list[np.ndarray], norm: int = 1, chunk: int = 128) -> torch.Tensor:
    out = []
    for s in range(0, len(images), chunk):
        out.append(model.encode_image(to_pixels(images[s:s + chunk], [norm] * len(images[s:s + chunk]))))
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.no_grad()
def encode_texts(model, tokens: Tokens, texts: list[str]) -> torch.Tensor:
    return F.normalize(model.encode_text(tokens(texts)).float(), dim=-1)


def resize_to_input(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    if image.shape[0] == SIZE and image.shape[1] == SIZE:
        return image
    return np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BILINEAR))


@torch.no_grad()
def evaluate(model, tokens: Tokens, n: int = 480, n_scenes: int = 400) -> dict:
    """Quick, fixed-seed evaluation (ImageNet normalisation and grey crop fill: the pipeline's defaults)."""
    rng = np.random.default_rng([EVAL_STREAM, 1234])
    results: dict[str, float] = {}
    # Single objects at native scale against 48 prompts `a {size} {colour} {shape}`.
    combos = [(s, c, h) for s in SIZES for c in COLOUR_NAMES for h in SHAPES]
    text = encode_texts(model, tokens, [f"a {s} {c} {h}" for s, c, h in combos])
    objs, images = [], []
    for _ in range(n):
        scene, _ = single_object(rng, location=0.0)
        objs.append(scene.objects[0])
        images.append(world.render(scene)[0])
    pred = (encode_images(model, images) @ text.T).argmax(1).tolist()
    results["single_colour"] = float(np.mean([combos[p][1] == o.colour for p, o in zip(pred, objs)]))
    results["single_shape"] = float(np.mean([combos[p][2] == o.shape for p, o in zip(pred, objs)]))
    results["single_size"] = float(np.mean([combos[p][0] == o.size for p, o in zip(pred, objs)]))
    results["single_joint48"] = float(np.mean([combos[p] == (o.size, o.colour, o.shape) for p, o in zip(pred, objs)]))
    # Pipeline-style masked crops (tight box, grey fill, stretched) against 24 prompts.
    pairs24 = [(c, h) for c in COLOUR_NAMES for h in SHAPES]
    text24 = encode_texts(model, tokens, [f"a {c} {h}" for c, h in pairs24])
    objs, crops = [], []
    for _ in range(n):
        scene = world.sample_scene(rng, SIZE, (1, 4))
        image, masks = world.render(scene)
        k = int(rng.integers(len(scene.objects)))
        objs.append(scene.objects[k])
        crops.append(world.masked_box_crop(image, masks[k], CROP_FILLS[0], SIZE, square=False))
    pred = (encode_images(model, crops) @ text24.T).argmax(1).tolist()
    results["crop_colour"] = float(np.mean([pairs24[p][0] == o.colour for p, o in zip(pred, objs)]))
    results["crop_shape"] = float(np.mean([pairs24[p][1] == o.shape for p, o in zip(pred, objs)]))
    results["crop_joint24"] = float(np.mean([pairs24[p] == (o.colour, o.shape) for p, o in zip(pred, objs)]))
    # Referring by masked-crop score on evaluation-style scenes (128 px, 2-6 objects, some overlap):
    # the target's colour + shape is unique in the scene; pick the object whose crop best matches.
    hits, hard_hits, chance, hard_chance = [], [], [], []
    for _ in range(n_scenes):
        scene, image, masks = world.sample_eval_scene(rng)
        names = [o.name for o in scene.objects]
        unique = [k for k, name in enumerate(names) if names.count(name) == 1]
        if not unique:
            continue
        k = unique[int(rng.integers(len(unique)))]
        target = scene.objects[k]
        crops = [world.masked_box_crop(image, m, CROP_FILLS[0], SIZE, square=False) for m in masks]
        scores = encode_images(model, crops) @ encode_texts(model, tokens, [f"a {target.colour} {target.shape}"]).T
        hit = int(scores[:, 0].argmax()) == k
        hits.append(hit)
        chance.append(1.0 / len(masks))
        if any(o.colour == target.colour or o.shape == target.shape for i, o in enumerate(scene.objects) if i != k):
            hard_hits.append(hit)
            hard_chance.append(1.0 / len(masks))
    results["refer_crop"] = float(np.mean(hits))
    results["refer_crop_chance"] = float(np.mean(chance))
    results["refer_crop_hard"] = float(np.mean(hard_hits))
    results["refer_crop_hard_chance"] = float(np.mean(hard_chance))
    results["refer_scenes"] = len(hits)
    results["refer_scenes_hard"] = len(hard_hits)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()}


# ------------------------------------------------------------------------------------------ main
def eval_only(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model = open_clip.create_model(MODEL_NAME, pretrained=str(out), precision="fp32").eval()
    t0 = time.perf_counter()
    metrics = evaluate(model, Tokens(open_clip.get_tokenizer(MODEL_NAME)), n=args.eval_samples,
                       n_scenes=args.eval_samples)
    print(f"eval ({time.perf_counter() - t0:.1f}s): " + json.dumps(metrics), flush=True)
    info_path = out.with_suffix(".json")
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        info["eval"] = metrics
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        print(f"updated {info_path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget (eval excluded)")
    parser.add_argument("--max-steps", type=int, default=0, help="if > 0: step-based cosine over this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--pairs", type=float, default=0.4, help="fraction of each batch built as hard-negative pairs")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true", help="train in fp32 instead of bf16 autocast")
    parser.add_argument("--out", default=str(REPO / "copatch/weights/copatch-demo.pt"))
    parser.add_argument("--eval-samples", type=int, default=480)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-only", action="store_true",
                        help="only re-run the evaluation of the weights at --out and update its JSON")
    args = parser.parse_args(argv)
    if args.eval_only:
        return eval_only(args)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = open_clip.create_model(MODEL_NAME, precision="fp32")
    model.train()
    tokens = Tokens(open_clip.get_tokenizer(MODEL_NAME))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{MODEL_NAME}: {n_params / 1e6:.3f} M parameters; torch {torch.__version__}, open_clip "
          f"{open_clip.__version__}, {torch.get_num_threads()} threads", flush=True)
    loss_fn = open_clip.loss.ClipLoss()
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng([TRAIN_STREAM, args.seed])
    norm_rng = np.random.default_rng([TRAIN_STREAM, args.seed, 1])

    budget = args.minutes * 60.0
    start = time.perf_counter()
    warmup_end: float | None = None
    step, losses, data_time = 0, [], 0.0
    while True:
        elapsed = time.perf_counter() - start
        if args.max_steps and step >= args.max_steps:
            break
        if not args.max_steps and elapsed >= budget:
            break
        if step == args.warmup:
            warmup_end = elapsed
        lr = learning_rate(step, elapsed, warmup_end, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        images, captions = make_batch(rng, args.batch_size, args.pairs)
        pixels = to_pixels(images, norm_rng.integers(0, 2, size=len(images)).tolist())
        text = tokens(captions)
        data_time += time.perf_counter() - t0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            image_features, text_features, logit_scale = model(pixels, text)
            loss = loss_fn(image_features.float(), text_features.float(), logit_scale.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # as open_clip's trainer: clamp the temperature to at most 100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0 or step == 1:
            t = time.perf_counter() - start
            print(f"step {step:5d}  t {t:7.1f}s  lr {lr:.2e}  loss {np.mean(losses[-args.log_every:]):.4f}  "
                  f"scale {model.logit_scale.exp().item():6.2f}  {t / step:.2f} s/step  "
                  f"(data {data_time / step:.3f})", flush=True)
    wall = time.perf_counter() - start
    final_loss = float(np.mean(losses[-20:])) if losses else float("nan")
    print(f"trained {step} steps in {wall:.1f}s; final loss (mean of last 20) {final_loss:.4f}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).clone()
             for k, v in model.state_dict().items()}
    torch.save(state, out)
    print(f"saved fp16 state_dict to {out} ({out.stat().st_size / 1e6:.1f} MB)", flush=True)

    model.eval()
    reloaded = open_clip.create_model(MODEL_NAME, pretrained=str(out), precision="fp32").eval()
    t0 = time.perf_counter()
    metrics = evaluate(reloaded, tokens, n=args.eval_samples, n_scenes=args.eval_samples)
    eval_time = time.perf_counter() - t0
    print(f"eval ({eval_time:.1f}s, fp16 weights reloaded): " + json.dumps(metrics), flush=True)

    info = {
        "model": MODEL_NAME,
        "config": json.loads((REPO / "copatch/model_configs/copatch-demo.json").read_text()),
        "parameters": n_params,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}
        | {"loss": "open_clip.loss.ClipLoss", "optimizer": "AdamW", "betas": [0.9, 0.98], "eps": 1e-6,
           "schedule": "linear warmup then cosine over " + ("steps" if args.max_steps else "wall-clock time"),
           "precision": "fp32" if args.no_bf16 else "bf16 autocast", "saved_dtype": "float16"},
        "steps": step,
        "final_loss": round(final_loss, 4),
        "final_logit_scale": round(model.logit_scale.exp().item(), 3),
        "wall_time_s": round(wall, 1),
        "seconds_per_step": round(wall / max(1, step), 3),
        "eval_time_s": round(eval_time, 1),
        "eval": metrics,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "open_clip": open_clip.__version__},
    }
    info_path = out.with_suffix(".json")
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {info_path}", flush=True)


if __name__ == "__main__":
    main()
