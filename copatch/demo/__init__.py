"""The built-in demo world: a synthetic referring dataset and a tiny CLIP trained on it.

- `copatch.demo.world`: pure, seeded rendering of coloured shapes (shared by the dataset writer
  and the training script `scripts/train_demo_clip.py`).
- `copatch.demo.dataset`: `write_demo_refer` writes the REFER-format dataset (with `kind` labels
  per expression) and stored proposals; `python -m copatch.demo.dataset --root ... --seed ...`.
- `copatch.demo.datamodule`: `DemoReferDataModule`, the REFER DataModule over that dataset.
- The tiny CLIP `copatch-demo` (open_clip config `copatch/model_configs/copatch-demo.json`) ships
  its fp16 weights at `WEIGHTS`; load them with
  `copatch.clip_model.create_clip(MODEL_NAME, str(WEIGHTS))`.
"""

from pathlib import Path

MODEL_NAME = "copatch-demo"
WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "copatch-demo.pt"
WEIGHTS_INFO = WEIGHTS.with_suffix(".json")

__all__ = ["MODEL_NAME", "WEIGHTS", "WEIGHTS_INFO"]
