"""Peak memory and time of one large image with and without `CoPatch(max_side=...)`.

A synthetic `--size` image (default 3000x4000, HxW: a 12 MP photo) with `--proposals` random
elliptical blobs given as full-size `[N, H, W]` bool proposals to `CoPatch.segment`, and
`--expressions` expressions, on the demo preset (the shipped tiny CLIP; the cost of the mask work does
not depend on the weights). Each mode (`--max-side off 1024 640`) runs in a subprocess of its own, so
that its peak is its own:

- `peak RSS`: the process's `ru_maxrss` (its whole life: model, inputs and the call);
- `call +RSS`: the peak of VmRSS (sampled every 5 ms by a thread) during the `segment` call, over the
  RSS just before it; the inputs (the image and the 2.3 GiB of full-size proposals at 200 x 12 MP)
  are already there, so this is what the pipeline itself costs;
- `time`: wall time of the `segment` call, after a warm-up call on a small image (parser and text
  encoder loaded, caches cold for the big image's expressions).

    python benchmarks/large_image.py                                   # 200 proposals, off / 1024 / 640
    python benchmarks/large_image.py --proposals 50 --max-side off 1024

It prints a Markdown table (and one JSON line per mode). A mode that runs out of memory or time is
reported as such; lower `--proposals` for the full-size mode on a small machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = ["the red circle", "the big blue square on the left", "the green star above the yellow triangle"]


def blobs(n: int, height: int, width: int, seed: int = 0):
    """`[n, H, W]` bool random ellipses (1-12 % of the shorter side in radius), drawn in their boxes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    masks = np.zeros((n, height, width), dtype=bool)
    short = min(height, width)
    for k in range(n):
        ry, rx = rng.uniform(0.01, 0.12, 2) * short
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        y0, y1 = int(max(0, cy - ry)), int(min(height, cy + ry + 1))
        x0, x1 = int(max(0, cx - rx)), int(min(width, cx + rx + 1))
        yy, xx = np.ogrid[y0:y1, x0:x1]
        masks[k, y0:y1, x0:x1] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return masks


def image(height: int, width: int, masks, seed: int = 0):
    """`[H, W, 3] uint8`: a noisy grey background with the first masks painted in flat colours."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(120, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    for k in range(min(len(masks), 12)):
        pixels[masks[k]] = rng.integers(0, 256, 3, dtype=np.uint8)
    return pixels


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(args: argparse.Namespace) -> dict:
    """One mode, in this process: build the inputs, warm up, time one `segment` call."""
    import numpy as np
    import torch

    from copatch.module import CoPatch

    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.lower().split("x"))
    max_side = None if args.mode == "off" else int(args.mode)
    masks = blobs(args.proposals, height, width)
    pixels = image(height, width, masks)
    proposals = torch.from_numpy(masks)
    model = CoPatch.from_preset("demo", max_side=max_side).eval()
    texts = TEXTS[: args.expressions] + [f"thing number {k}" for k in range(max(0, args.expressions - len(TEXTS)))]
    small = np.zeros((64, 64, 3), dtype=np.uint8)
    small[8:40, 8:40] = (215, 40, 40)
    model.segment(small, ["warm up"], proposals=torch.from_numpy(np.stack([small[..., 0] > 0])))

    before = rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    preds = model.segment(pixels, texts, proposals=proposals)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    assert all(tuple(p.mask.shape) == (height, width) for p in preds)
    return {"mode": args.mode, "size": f"{height}x{width}", "proposals": args.proposals, "expressions": len(texts),
            "seconds": round(seconds, 2), "rss_before_gib": round(before / 2**30, 2),
            "call_peak_extra_gib": round((peak[0] - before) / 2**30, 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2),
            "chosen": [p.chosen for p in preds]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="3000x4000", help="HxW (default: %(default)s)")
    parser.add_argument("--proposals", type=int, default=200)
    parser.add_argument("--expressions", type=int, default=3)
    parser.add_argument("--max-side", nargs="+", default=["off", "1024", "640"], help="modes: off or pixels")
    parser.add_argument("--threads", type=int, default=torch_threads())
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mode")
    parser.add_argument("--worker", metavar="MODE", dest="mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode is not None:
        print(json.dumps(worker(args)), flush=True)
        return []
    rows = []
    for mode in args.max_side:
        cmd = [sys.executable, __file__, "--worker", mode, "--size", args.size, "--proposals", str(args.proposals),
               "--expressions", str(args.expressions), "--threads", str(args.threads)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rows.append({"mode": mode, "error": f"over {args.timeout:g} s"})
            continue
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            why = "killed (out of memory?)" if done.returncode < 0 else done.stderr.strip().splitlines()[-1:]
            rows.append({"mode": mode, "error": f"exit {done.returncode}: {why}"})
            continue
        rows.append(json.loads(lines[-1]))
        print(lines[-1], flush=True)
    print(f"\n{args.size} (HxW), {args.proposals} proposals, {args.expressions} expressions, demo preset, CPU "
          f"{args.threads} threads\n")
    print("| max_side | time | peak RSS | call +RSS | chosen |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['error']} | | | |")
        else:
            print(f"| {r['mode']} | {r['seconds']:.1f} s | {r['peak_rss_gib']:.2f} GiB | "
                  f"{r['call_peak_extra_gib']:.2f} GiB | {r['chosen']} |")
    return rows


def torch_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    main()
