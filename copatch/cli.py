"""The `copatch` command: a LightningCLI limited to `predict` (CoPatch has nothing to train), plus
`copatch evaluate OUTPUT_DIR`, which recomputes a run's metrics from its prediction files.

    copatch predict --config configs/toy.yaml
    copatch predict --config configs/model/vitb16.yaml --config configs/data/refcoco.yaml \
        --config configs/trainer/gpu.yaml --model.clip_pretrained /weights/vitb16-openai.bin
    copatch evaluate outputs/toy [--ground-truth]

Several `--config` files compose (later ones override earlier ones); `--print_config` shows the result.
Rerunning a `predict` command with the same `--trainer.default_root_dir` resumes it.
"""

from __future__ import annotations

import os
import sys

# Nothing may reach a model hub at run time; huggingface_hub reads this when it is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning.pytorch import LightningDataModule  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402

from copatch.module import CoPatch  # noqa: E402

DESCRIPTION = (
    "Zero-shot referring image segmentation with CoPatch. Subcommands: `copatch predict --config FILE ...` runs "
    "the model (rerun it with the same --trainer.default_root_dir to resume an interrupted run); "
    "`copatch evaluate OUTPUT_DIR [--ground-truth]` recomputes the metrics of a run from its prediction files "
    "(`copatch evaluate --help`)."
)


class CoPatchCLI(LightningCLI):
    """LightningCLI with only the `predict` subcommand."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"predict": {"model", "dataloaders", "datamodule"}}


def build_cli(args: ArgsType = None) -> CoPatchCLI:
    """Parse `args` (default: `sys.argv`) and run the subcommand; returns the CLI for inspection."""
    return CoPatchCLI(CoPatch, LightningDataModule, subclass_mode_data=True, seed_everything_default=0,
                      save_config_kwargs={"overwrite": True}, parser_kwargs={"description": DESCRIPTION},
                      args=args)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `copatch` console script. `evaluate` is dispatched before LightningCLI parses
    (it is not a Trainer method); everything else goes to LightningCLI."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "evaluate":
        from copatch.evaluate import main as evaluate

        status = evaluate(args[1:])
        if status:
            sys.exit(status)
        return
    build_cli(argv)  # None: LightningCLI reads sys.argv itself
    # Leaving a gloo process group to the interpreter's exit can abort the process ("terminate called
    # without an active exception") after every result is written; close it explicitly.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
