"""The `copatch` command: a LightningCLI limited to `predict` (CoPatch has nothing to train).

    copatch predict --config configs/toy.yaml
    copatch predict --config configs/model/vitb16.yaml --config configs/data/refcoco.yaml \
        --config configs/trainer/gpu.yaml --model.clip_pretrained /weights/vitb16-openai.bin

Several `--config` files compose (later ones override earlier ones); `--print_config` shows the result.
"""

from __future__ import annotations

import os

# Nothing may reach a model hub at run time; huggingface_hub reads this when it is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning.pytorch import LightningDataModule  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402

from copatch.module import CoPatch  # noqa: E402


class CoPatchCLI(LightningCLI):
    """LightningCLI with only the `predict` subcommand."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"predict": {"model", "dataloaders", "datamodule"}}


def build_cli(args: ArgsType = None) -> CoPatchCLI:
    """Parse `args` (default: `sys.argv`) and run the subcommand; returns the CLI for inspection."""
    return CoPatchCLI(CoPatch, LightningDataModule, subclass_mode_data=True, seed_everything_default=0,
                      save_config_kwargs={"overwrite": True}, args=args)


def main() -> None:
    """Entry point of the `copatch` console script (returns None so the exit status is 0)."""
    build_cli()


if __name__ == "__main__":
    main()
