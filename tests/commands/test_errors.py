"""Known user errors of the `copatch` command: one short message, a non-zero exit code, no traceback;
`--debug` / COPATCH_DEBUG=1 show the traceback. Also the oracle guard and `copatch --help`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Imported here, not first inside a test: Lightning's log handler keeps the stderr of the moment it is
# imported, and a test's captured stderr is closed after that test.
import copatch.commands.predict  # noqa: F401,E402
from copatch.cli import main
from copatch.errors import UserError, UserValueError

CONFIGS = Path(__file__).parents[2] / "configs"
TOY = str(CONFIGS / "toy.yaml")
MAX_LINES = 6


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def short_error(err: str) -> list[str]:
    """The lines of the `copatch: error:` message, checked for the format every error shares."""
    assert "Traceback" not in err
    lines = err[err.index("copatch: error: "):].rstrip("\n").splitlines()
    assert 1 <= len(lines) <= MAX_LINES, lines
    return lines


def test_missing_config_file(capsys, tmp_path):
    code, err = run(capsys, "predict", "--config", str(tmp_path / "nope.yaml"))
    lines = short_error(err)
    assert code == 2 and len(lines) <= 2
    assert " ".join(line.strip() for line in lines) == (
        f"copatch: error: config file {tmp_path / 'nope.yaml'} does not exist: check the --config "
        "path (the shipped ones are in configs/).")
    assert "usage:" not in err  # no 90-line usage dump


def test_unknown_option_suggests_the_nearest(capsys):
    code, err = run(capsys, "predict", "--config", TOY, "--model.exit_layr", "3")
    assert code == 2
    assert short_error(err) == ["copatch: error: unknown option --model.exit_layr: did you mean --model.exit_layer?"]


@pytest.mark.parametrize("argv, message", [
    (["--model.exit_layer", "x"], "--model.exit_layer 'x' is not valid: it takes int."),
    (["--model.parser", "stanza"], "--model.parser 'stanza' is not valid: it takes ExpressionParser or null"),
])
def test_a_value_of_the_wrong_type_names_the_option_and_what_it_takes(capsys, argv, message):
    code, err = run(capsys, "predict", "--config", str(CONFIGS / "demo.yaml"), *argv)
    lines = short_error(err)
    assert code == 2 and message in " ".join(lines) and "Union" not in err
    if "parser" in argv[0]:
        assert "--model.switches.parser stanza|spacy" in " ".join(lines)


def test_unknown_command(capsys):
    code, err = run(capsys, "fit")
    assert code == 2
    (line,) = short_error(err)
    assert line.startswith("copatch: error: unknown command 'fit'") and "predict, evaluate" in line


def test_missing_weights_names_the_file_the_option_and_the_fetch_command(capsys, tmp_path):
    from copatch.downloads import DOWNLOADS

    code, err = run(capsys, "predict", "--config", TOY, "--config", str(CONFIGS / "model" / "vitb16.yaml"),
                    "--trainer.default_root_dir", str(tmp_path / "out"))
    text = " ".join(line.strip() for line in short_error(err))
    assert code == 1
    assert "CLIP checkpoint weights/vitb16-openai.bin does not exist" in text
    assert DOWNLOADS["clip-vitb16"].command in text and "--model.clip_pretrained" in text
    assert not (tmp_path / "out").exists()


def test_no_proposer_stops_before_anything_is_written(capsys, tmp_path):
    out = tmp_path / "out"
    code, err = run(capsys, "predict", "--config", TOY, "--model.proposer", "null", "--trainer.default_root_dir",
                    str(out), "--data.init_args.root", str(tmp_path / "data"))
    text = " ".join(line.strip() for line in short_error(err))
    assert code == 1
    assert "no proposer" in text and "--model.proposer" in text
    for name in ("stored", "mask2former", "ground_truth"):
        assert f"configs/proposers/{name}.yaml" in text
    assert not out.exists() and not (tmp_path / "data").exists()


def test_missing_stanza_resources_found_before_the_first_batch_and_no_run_json(capsys, tmp_path):
    out = tmp_path / "out"
    code, err = run(capsys, "predict", "--config", TOY, "--config", str(CONFIGS / "presets" / "paper.yaml"),
                    "--model.stanza_resources", str(tmp_path / "stanza"), "--trainer.default_root_dir", str(out),
                    "--data.init_args.root", str(tmp_path / "data"))
    text = " ".join(line.strip() for line in short_error(err))
    assert code == 1
    assert f"stanza resources not found in {tmp_path / 'stanza'} (no resources.json)" in text
    assert "--model.stanza_resources" in text and "stanza.download('en'" in text
    assert not (out / "run.json").exists() and not out.exists()


def test_output_dir_that_cannot_be_created(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, err = run(capsys, "predict", "--config", TOY, "--trainer.default_root_dir", str(tmp_path / "afile" / "out"),
                    "--data.init_args.root", str(tmp_path / "data"))
    text = " ".join(line.strip() for line in short_error(err))
    assert code == 1
    assert f"output dir {tmp_path / 'afile' / 'out'} cannot be created" in text
    assert "--trainer.default_root_dir" in text


def test_read_only_output_dir(capsys, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes into a 0555 folder: make the probe fail as the kernel would for a user
        import errno
        import tempfile

        real = tempfile.TemporaryFile

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == ro:
                raise PermissionError(errno.EACCES, "Permission denied", str(ro))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    try:
        code, err = run(capsys, "predict", "--config", TOY, "--trainer.default_root_dir", str(ro / "out"),
                        "--data.init_args.root", str(tmp_path / "data"))
    finally:
        ro.chmod(0o755)
    text = " ".join(line.strip() for line in short_error(err))
    assert code == 1 and f"output dir {ro / 'out'} is not writable (Permission denied" in text
    assert not (ro / "out").exists()


def test_union_noise_is_reduced_to_our_message(capsys, tmp_path):
    code, err = run(capsys, "predict", "--config", TOY, "--config", str(CONFIGS / "proposers" / "mask2former.yaml"),
                    "--trainer.default_root_dir", str(tmp_path / "out"))
    text = " ".join(line.strip() for line in short_error(err))
    assert code == 1
    assert "Does not validate" not in err and "Given value" not in err and "Expected a" not in err
    assert text.startswith("copatch: error: Mask2Former model folder weights/mask2former-swin-large-coco-panoptic")
    assert "hf download facebook/mask2former-swin-large-coco-panoptic --local-dir" in text


def test_debug_flag_and_environment_show_the_exception(monkeypatch, tmp_path):
    argv = ["predict", "--config", TOY, "--model.proposer", "null", "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(UserValueError, match="no proposer"):
        main([*argv, "--debug"])
    monkeypatch.setenv("COPATCH_DEBUG", "1")
    with pytest.raises(UserError, match="no proposer"):
        main(argv)


def test_debug_in_a_subprocess_prints_the_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COPATCH_DEBUG": "1"}
    code = "import sys; from copatch.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "predict", "--config", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_an_unknown_error_is_not_hidden():
    from copatch.commands.errors import run_command

    def broken(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_command(broken, [])


# ---- the oracle guard (API side; the CLI side is test_no_proposer_stops_before_anything_is_written) -----

def test_no_default_proposer_and_segment_with_proposals(tiny_config):
    import torch
    from lightning.pytorch import Trainer

    from copatch.module import CoPatch

    torch.manual_seed(0)
    model = CoPatch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128)
    assert model.proposer is None and not model.is_oracle
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs candidate masks"):
        model.segment(image, "a dog")
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :16], masks[1, 16:] = True, True
    (pred,) = model.segment(image, "a dog", proposals=masks)
    assert pred.mask.shape == (32, 32)
    with pytest.raises(UserValueError, match="configs/proposers/ground_truth.yaml"):
        model.check_ready()
    assert model.describe()["oracle"] is False
    with pytest.raises(UserValueError, match="no proposer"):  # a Trainer of one's own: stops in setup
        Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).predict(model, [[]])


# ---- copatch --help ---------------------------------------------------------------------------------

def test_help_lists_every_command_and_imports_nothing_heavy():
    from copatch import commands

    code = ("import sys; from copatch.cli import main; rc = main(['--help']); "
            "print('HEAVY', sorted(m for m in ('torch', 'lightning', 'open_clip') if m in sys.modules)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "HEAVY []" in proc.stdout
    names = commands.available()
    assert names[:2] == ["predict", "evaluate"]
    for name in names:
        assert f"  {name}" in proc.stdout and commands.help_line(name) in proc.stdout
        module = commands.load(name)
        assert module.HELP == commands.help_line(name) and callable(module.main)


def test_predict_help_leaves_out_training_options_and_every_switch_has_help(capsys):
    from copatch.commands import predict
    from copatch.module import CoPatch
    from copatch.switches import Switches
    import dataclasses
    import inspect

    assert main(["predict", "--help"]) == 0
    out = capsys.readouterr().out
    for gone in ("--optimizer", "--lr_scheduler", "--trainer.max_epochs", "--trainer.gradient_clip_val"):
        assert gone not in out
    assert "--ckpt_path" in out and "--trainer.enable_progress_bar" in out
    actions = {a.dest: a for p in predict._PARSERS for a in p._actions}
    expected = [f"model.{n}" for n in inspect.signature(CoPatch.__init__).parameters
                if n not in ("self", "switches")]
    expected += [f"model.switches.{f.name}" for f in dataclasses.fields(Switches)]
    for dest in expected:
        assert dest in actions, dest
        assert actions[dest].help and actions[dest].help.strip(), f"--{dest} has no help"
