"""`copatch predict`: a LightningCLI limited to `predict` (CoPatch has nothing to train).

    copatch predict --config configs/demo.yaml
    copatch predict --config configs/model/vitb16.yaml --config configs/data/refcoco.yaml \
        --config configs/proposers/mask2former.yaml --config configs/trainer/gpu.yaml

Several `--config` files compose (later ones override earlier ones); `--print_config` shows the result.
Rerunning with the same `--trainer.default_root_dir` resumes. A rich progress bar is on by default
(`--trainer.enable_progress_bar false` turns it off); at the end the path of every file written is
printed. Before the Trainer starts, `CoPatch.check_ready` (a proposer; stanza resources when the stanza
parser is used) and the output dir are checked, so a run that cannot work writes nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

# Nothing may reach a model hub at run time; huggingface_hub reads this when it is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning.pytorch import LightningDataModule  # noqa: E402
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402

from copatch.commands import errors  # noqa: E402
from copatch.errors import UserFileNotFound, cli_words, interface_words  # noqa: E402
from copatch.evaluate import hold_results  # noqa: E402
from copatch.module import CoPatch  # noqa: E402

HELP = "run CoPatch over a dataset config: metrics, one prediction line per expression (rerun to resume)"

DESCRIPTION = (
    "Run CoPatch over a dataset (compose --config files: configs/model, configs/data, configs/proposers, "
    "configs/trainer). Rerun with the same --trainer.default_root_dir to resume an interrupted run. A progress "
    "bar is shown unless --trainer.enable_progress_bar false; --debug shows the traceback of an error."
)

# The parsers LightningCLI built, for the "did you mean" of an unknown option.
_PARSERS: list[Any] = []


class _NoTips(logging.Filter):
    """Drops Lightning's advertising lines ("💡 Tip: ... try installing litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith("💡 Tip")


def quiet_lightning() -> None:
    """No Lightning tips, and no deprecation warning that Lightning's own pytree helper triggers in
    this torch (`LeafSpec`); both say nothing about the run."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    # `copatch.cli` passes the arguments it took from sys.argv on: not the mistake this warns about.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")


def check_output_dir(path: str | os.PathLike) -> None:
    """Refuse an output dir that cannot be created or written, before anything runs. Leaves nothing
    behind: writability is probed in the nearest folder that exists.

    Raises:
        UserFileNotFound: naming the folder and `--trainer.default_root_dir`.
    """
    import tempfile

    target = Path(path).absolute()
    probe = target
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    fix = "choose another with --trainer.default_root_dir"
    if not probe.is_dir():
        raise UserFileNotFound(f"output dir {target} cannot be created: {probe} is a file, not a folder; {fix}.")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise UserFileNotFound(f"output dir {target} is not writable ({err.strerror} in {probe}); {fix}.") from err


def written_files(root: Path, since: float) -> list[str]:
    """The entries of `root` written at or after `since` (a folder as `dir/ (N files)`), sorted."""
    out = []
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            files = [f for f in entry.rglob("*") if f.is_file() and f.stat().st_mtime >= since]
            if files:
                out.append(f"{entry}/ ({len(files)} files)")
        elif entry.stat().st_mtime >= since:
            out.append(str(entry))
    return out


# Trainer arguments that only concern training or validation: left out of `copatch predict` (and its
# --help); the Trainer gets its defaults for them.
TRAINING_ONLY = frozenset({
    "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches", "limit_val_batches",
    "limit_test_batches", "overfit_batches", "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps",
    "log_every_n_steps", "enable_checkpointing", "accumulate_grad_batches", "gradient_clip_val",
    "gradient_clip_algorithm", "detect_anomaly", "reload_dataloaders_every_n_epochs", "sync_batchnorm",
    "enable_autolog_hparams", "model_registry",
})


class CoPatchCLI(LightningCLI):
    """LightningCLI with only the `predict` subcommand, no optimizer options and no training-only
    Trainer options."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"predict": {"model", "dataloaders", "datamodule"}}

    def add_core_arguments_to_parser(self, parser: Any) -> None:
        # As LightningCLI's, with the Trainer's training-only arguments skipped.
        parser.add_class_arguments(self.trainer_class, "trainer", fail_untyped=False, instantiate=False,
                                   sub_configs=True, skip=set(TRAINING_ONLY))
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)

    def init_parser(self, **kwargs: Any) -> Any:
        parser = super().init_parser(**kwargs)
        _PARSERS.append(parser)
        return parser

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # A rich progress bar unless the config turns the bar off or brings a bar of its own.
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, RichProgressBar(leave=True)]
        return super().instantiate_trainer(**kwargs)

    def before_predict(self) -> None:
        """Checks that need no model run, so a run that cannot work stops before anything is written."""
        check = getattr(self.model, "check_ready", None)
        if callable(check):
            check()
        check_output_dir(self.trainer.default_root_dir)
        hold_results(True)  # printed by `after_predict`, below the finished progress bar
        self._started = time.time() - 1.0  # file times have a coarse resolution on some file systems

    def after_predict(self) -> None:
        """Print the results, then the path of every file the run wrote."""
        for text in hold_results(False):
            print(text, flush=True)
        if not self.trainer.is_global_zero:
            return
        files = written_files(Path(self.trainer.default_root_dir), getattr(self, "_started", 0.0))
        if files:
            print("Wrote:\n  " + "\n  ".join(files), flush=True)


def build_cli(args: ArgsType = None) -> CoPatchCLI:
    """Parse `args` (default: `sys.argv`) and run `predict`; returns the CLI for inspection. Errors are
    raised (not printed): `main` turns the known ones into a short message."""
    quiet_lightning()
    _PARSERS.clear()
    try:
        with interface_words(cli_words):  # errors spell options as on this command line: --model.x
            return CoPatchCLI(CoPatch, LightningDataModule, subclass_mode_data=True, seed_everything_default=0,
                              save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                              parser_kwargs={"description": DESCRIPTION, "exit_on_error": False}, args=args)
    finally:
        for text in hold_results(False):  # a run that stopped early still shows what it computed
            print(text, flush=True)


def _option_names() -> list[str]:
    names: list[str] = []
    for parser in _PARSERS:
        for action in getattr(parser, "_actions", []):
            names += [o for o in action.option_strings if o.startswith("--")]
    return sorted(set(names))


def main(argv: list[str]) -> int:
    """`copatch predict ...`; returns the exit status."""
    try:
        build_cli(["predict", *argv])
    except Exception as err:
        if type(err).__name__ == "ArgumentError":
            errors.KNOWN_OPTIONS[:] = _option_names()
        raise
    finally:
        # Leaving a gloo process group to the interpreter's exit can abort the process ("terminate called
        # without an active exception") after every result is written; close it explicitly.
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_command(main, sys.argv[1:], prog="copatch predict"))
