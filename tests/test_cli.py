"""The `copatch` console script (a LightningCLI limited to predict) on the built-in toy config."""

import json
import pickle
from pathlib import Path

import pytest

from copatch.cli import build_cli as main
from copatch.clip_model import CheckpointError

CONFIGS = Path(__file__).parents[1] / "configs"


def test_predict_writes_metrics_and_one_prediction_per_expression(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    main(["predict", "--config", str(CONFIGS / "toy.yaml"), "--trainer.default_root_dir", str(out),
          "--data.init_args.root", str(data)])
    metrics = json.loads((out / "metrics.json").read_text())
    with open(data / "toy" / "refs(unc).p", "rb") as f:
        expected_ids = sorted(s["sent_id"] for r in pickle.load(f) if r["split"] == "val" for s in r["sentences"])
    lines = [json.loads(line) for line in (out / "predictions.rank0.jsonl").read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == expected_ids
    assert metrics["metrics"]["n"] == len(expected_ids)
    mean_iou = 100 * sum(line["iou"] for line in lines) / len(lines)
    assert metrics["metrics"]["mIoU"] == pytest.approx(mean_iou)
    assert metrics["setup"]["switches"]["similarity_norm"] == "patches"
    assert all(set(line["mask"]) == {"size", "counts"} for line in lines)


def test_only_predict_is_offered(capsys):
    from copatch.cli import main as copatch

    assert copatch(["fit", "--config", str(CONFIGS / "toy.yaml")]) == 2
    assert "predict" in capsys.readouterr().err


def test_backbone_preset_without_weights_names_the_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"weights/vitb16-openai\.bin.*clip_pretrained"):
        main(["predict", "--config", str(CONFIGS / "toy.yaml"), "--config", str(CONFIGS / "model" / "vitb16.yaml"),
              "--trainer.default_root_dir", str(tmp_path)])


@pytest.mark.parametrize("preset", ["reference", "paper"])
def test_preset_files_set_exactly_the_switches_of_the_python_presets(preset):
    import yaml

    from copatch.switches import Switches

    config = yaml.safe_load((CONFIGS / "presets" / f"{preset}.yaml").read_text())
    assert config["model"]["switches"] == Switches.preset(preset).__dict__


def test_console_script_exits_0(tmp_path):
    import os
    import subprocess
    import sys

    out, data = tmp_path / "run", tmp_path / "data"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", "import sys; from copatch.cli import main; sys.exit(main())",
                           "predict", "--config", str(CONFIGS / "toy.yaml"), "--trainer.default_root_dir", str(out),
                           "--data.init_args.root", str(data)],
                          capture_output=True, text=True, env=env, timeout=300)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mIoU" in console and (out / "metrics.json").is_file()
    # A clean console: no Lightning tips, no LeafSpec deprecation; the oracle said at start and in the
    # results; a progress bar by default; every file written listed at the end.
    assert "Tip" not in console and "LeafSpec" not in console
    assert "ORACLE run" in console and "CoPatch results, ORACLE" in console
    assert "Predicting" in console
    wrote = console[console.index("Wrote:"):]
    for name in ("metrics.json", "predictions.rank0.jsonl", "run.json"):
        assert str(out / name) in wrote
    assert f"{out / 'overlays'}/ (" in wrote
    assert json.loads((out / "metrics.json").read_text())["setup"]["oracle"] is True


@pytest.mark.parametrize("model", ["vitb32", "vitb16", "vith14"])
@pytest.mark.parametrize("data", ["refcoco", "refcoco+", "refcocog"])
def test_real_configs_compose(model, data, capsys):
    import yaml

    with pytest.raises(SystemExit) as done:
        main(["predict", "--config", str(CONFIGS / "model" / f"{model}.yaml"), "--config",
              str(CONFIGS / "data" / f"{data}.yaml"), "--config", str(CONFIGS / "trainer" / "ddp.yaml"),
              "--config", str(CONFIGS / "presets" / "paper.yaml"), "--print_config"])
    assert done.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["switches"]["clustering"] == "bfs"
    assert config["data"]["init_args"]["dataset"] == data
    assert config["model"]["visual_mix"] == (0.85 if data == "refcocog" else 0.95)
    assert config["trainer"]["strategy"] == "ddp"
    assert config["trainer"]["precision"] == "32-true"  # fp32 unless bf16.yaml is added


def test_bf16_overlay_switches_precision_only(capsys):
    import yaml

    with pytest.raises(SystemExit):
        main(["predict", "--config", str(CONFIGS / "model" / "vitb16.yaml"), "--config",
              str(CONFIGS / "data" / "refcoco.yaml"), "--config", str(CONFIGS / "trainer" / "gpu.yaml"),
              "--config", str(CONFIGS / "trainer" / "bf16.yaml"), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert config["trainer"]["accelerator"] == "gpu" and config["trainer"]["devices"] == 1


@pytest.mark.parametrize("proposer", ["stored", "ground_truth", "mask2former"])
def test_proposer_configs_compose(proposer, capsys):
    import yaml

    with pytest.raises(SystemExit):
        main(["predict", "--config", str(CONFIGS / "toy.yaml"), "--config",
              str(CONFIGS / "proposers" / f"{proposer}.yaml"), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["proposer"]["class_path"].rsplit(".", 1)[-1] in (
        "StoredProposals", "GroundTruthProposals", "Mask2FormerProposer")


def test_mask2former_config_without_weights_names_the_folder(tmp_path):
    # jsonargparse may wrap the error while it instantiates the proposer; the message stays the same.
    with pytest.raises((FileNotFoundError, ValueError), match="mask2former-swin-large-coco-panoptic.*Nothing is downloaded"):
        main(["predict", "--config", str(CONFIGS / "toy.yaml"), "--config",
              str(CONFIGS / "proposers" / "mask2former.yaml"), "--trainer.default_root_dir", str(tmp_path)])


def test_readme_weights_table_is_the_downloads_table():
    from copatch.downloads import markdown_table

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert markdown_table() in readme
