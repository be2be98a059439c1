"""Options that `copatch segment` and `copatch app` share: the model and where its candidate masks come
from. Light to import (no torch), so that `--help` stays fast."""

from __future__ import annotations

import argparse

from copatch.presets import PRESETS

PROPOSERS = ("demo", "sam", "mask2former", "stored")


def add_model_options(parser: argparse.ArgumentParser, stored: str) -> None:
    """`--preset`, `--proposer`, `--proposer-dir`, `--clip-checkpoint`; `stored` says how a stored
    proposals file is named in the proposer folder (e.g. `<image id>.json`)."""
    others = ", ".join(name for name in PRESETS if name != "demo")
    parser.add_argument("--preset", default="demo",
                        help=f"backbone preset: demo (default, shipped), {others} (these need their CLIP weights)")
    parser.add_argument("--proposer", choices=PROPOSERS, default=None,
                        help="candidate masks: demo (flat-colour regions; default with --preset demo), sam, "
                             f"mask2former (both need --proposer-dir), stored (<proposer-dir>/{stored})")
    parser.add_argument("--proposer-dir", metavar="DIR",
                        help="the SAM or Mask2Former model folder, or the stored proposals folder")
    parser.add_argument("--clip-checkpoint", metavar="FILE", help="CLIP weights (default: the preset's path)")
