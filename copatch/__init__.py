"""copatch: zero-shot referring image segmentation with CoPatch, on open_clip and PyTorch Lightning.

    from copatch import CoPatch
    model = CoPatch.from_preset("demo")
    predictions = model.segment(image, ["the red circle"], proposals=masks)

The heavy modules load on first use, so `import copatch.datamodules` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["CoPatch", "Switches", "Prediction", "ImageSample", "Expression"]

_EXPORTS = {"CoPatch": "copatch.module", "Switches": "copatch.switches", "Prediction": "copatch.types",
            "ImageSample": "copatch.types", "Expression": "copatch.types"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'copatch' has no attribute {name!r}")
