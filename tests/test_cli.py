"""The `copatch` console script (a LightningCLI limited to predict) on the built-in toy config."""

import json
import pickle
from pathlib import Path

import pytest

from copatch.cli import main
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
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "toy.yaml")])
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
