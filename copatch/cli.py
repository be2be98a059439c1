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


def main(args: ArgsType = None) -> CoPatchCLI:
    """Entry point of the `copatch` console script; `args` lets tests drive it without `sys.argv`."""
    return CoPatchCLI(CoPatch, LightningDataModule, subclass_mode_data=True, seed_everything_default=0,
                      save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
