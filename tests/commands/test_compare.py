"""`copatch compare`: one pass over the demo world gives, per method, the metrics of a separate
`copatch predict` run, with each image's features computed once per group of methods."""

import json
from pathlib import Path

import pytest
from PIL import Image

from copatch.cli import build_cli
from copatch.compare import draw_chart, markdown_tables, proposer_config
from copatch.compare import main as compare_main
from copatch.errors import UserFileNotFound, UserValueError

ROOT = Path(__file__).parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
METHODS = ("global_local", "hybridgl", "copatch", "copatch_paper")
IMAGES = 2


def _data_args(data: Path) -> list[str]:
    return ["--data.init_args.root", str(data), "--model.proposer.init_args.root", str(data / "proposals"),
            "--data.init_args.limit", str(IMAGES), "--trainer.enable_progress_bar", "false",
            "--model.switches.parser", "spacy"]  # the paper preset's stanza needs models not installed here


@pytest.mark.slow
def test_compare_equals_separate_predict_runs(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "compare"
    chart = tmp_path / "chart.png"
    assert compare_main(["--config", str(DEMO), "--methods", ",".join(METHODS), "--output", str(out),
                         "--chart", str(chart), *_data_args(data)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "comparison.json").read_text())
    # Image sides: once per image for the three methods that share their settings, once for the paper preset.
    assert summary["image_sides"] == {"global_local": IMAGES, "hybridgl": IMAGES, "copatch": IMAGES,
                                      "copatch_paper": IMAGES}
    table = (out / "comparison.md").read_text()
    assert table in printed
    for name in METHODS:
        compared = json.loads((out / name / "metrics.json").read_text())["metrics"]
        alone = tmp_path / f"alone-{name}"
        build_cli(["predict", "--config", str(DEMO), "--config", str(ROOT / "configs" / "methods" / f"{name}.yaml"),
                   "--trainer.default_root_dir", str(alone), *_data_args(data), "--trainer.callbacks",
                   '[{"class_path": "copatch.callbacks.prediction_writer.PredictionWriter"}]'])
        assert json.loads((alone / "metrics.json").read_text())["metrics"] == compared, name
        # The table shows these numbers.
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |") and "." in line)
        assert row.split(" | ")[2] == f"{compared['mIoU']:.1f}" and row.split(" | ")[1] == f"{compared['oIoU']:.1f}"
        # The same run setup: `copatch predict` would resume the method's dir.
        assert json.loads((alone / "run.json").read_text())["fingerprint"] == \
            json.loads((out / name / "run.json").read_text())["fingerprint"]
    # A method's config.yaml is `copatch predict`'s for its dir: rerun, it resumes with nothing left to do.
    before = (out / "hybridgl" / "predictions.rank0.jsonl").read_text()
    build_cli(["predict", "--config", str(out / "hybridgl" / "config.yaml")])
    assert (out / "hybridgl" / "predictions.rank0.jsonl").read_text() == before
    assert "mIoU by expression kind" in table and "attribute (" in table
    with Image.open(chart) as img:
        assert img.format == "PNG" and img.width > 600


def test_tables_and_chart_from_a_summary(tmp_path):
    metrics = {"oIoU": 20.0, "mIoU": 25.25, "Pr@0.5": 30.0, "Pr@0.6": 20.0, "Pr@0.7": 10.0, "Pr@0.8": 5.0,
               "Pr@0.9": 1.0, "n": 4, "oracle_oIoU": 40.0, "oracle_mIoU": 50.0}
    summary = {"methods": {"a": {"metrics": metrics, "mIoU_by_kind": {"x": 10.0, "y": 40.5},
                                 "oracle_mIoU_by_kind": {"x": 50.0, "y": 50.0}},
                           "b": {"metrics": {**metrics, "mIoU": float("nan")}, "mIoU_by_kind": {"x": 1.0},
                                 "oracle_mIoU_by_kind": {}}},
               "kinds": ["x", "y"], "kind_counts": {"x": 2, "y": 2}}
    text = markdown_tables(summary)
    assert "| a | 20.0 | 25.2 | 30.0 | 20.0 | 10.0 | 5.0 | 1.0 | 40.0 | 50.0 |" in text
    assert "| b | 20.0 | - |" in text  # NaN shows as a dash
    assert "| a | 10.0 | 40.5 | 25.2 |" in text and "| b | 1.0 | - | - |" in text
    path = draw_chart(summary, tmp_path / "c.png")
    with Image.open(path) as img:
        assert img.size[0] > img.size[1] > 300
    no_kinds = {**summary, "kinds": [], "kind_counts": {}}
    assert "by expression kind" not in markdown_tables(no_kinds)
    draw_chart(no_kinds, tmp_path / "d.png")


def test_bad_method_or_proposer_is_a_user_error(tmp_path):
    with pytest.raises(UserValueError, match="global_local"):
        compare_main(["--config", str(DEMO), "--methods", "copatch,nope"])
    with pytest.raises(UserValueError, match="twice"):
        compare_main(["--config", str(DEMO), "--methods", "copatch,copatch"])
    with pytest.raises(UserFileNotFound, match="configs/methods"):
        compare_main(["--config", str(DEMO), "--methods", str(tmp_path / "mine.yaml")])
    with pytest.raises(UserFileNotFound, match="stored"):
        proposer_config("nope")
    assert proposer_config("stored").endswith("configs/proposers/stored.yaml")
