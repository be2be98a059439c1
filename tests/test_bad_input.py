"""Bad input, each kind tried: either a clear error naming the file or id and the fix, or, where the run
can go on, a recorded failure (`failures.jsonl`) counted as IoU 0, and a rerun retries it."""

import json
import pickle
import shutil

import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image

from copatch.callbacks.overlay_writer import OverlayWriter
from copatch.callbacks.prediction_writer import PredictionWriter
from copatch.clip_model import CheckpointError
from copatch.datamodules.refer import ReferDataModule, ReferDataset
from copatch.module import CoPatch
from copatch.proposals import GroundTruthProposals, Proposals, StoredProposals
from copatch.run_state import read_jsonl, read_predictions

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

IMAGES = "images/mscoco/images/train2014"


def image_path(root, image_id):
    return root / IMAGES / f"COCO_train2014_{image_id:012d}.jpg"


def tiny_model(tiny_config):
    torch.manual_seed(0)
    return CoPatch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128, proposer=GroundTruthProposals())


@pytest.fixture(scope="module")
def model(tiny_config):
    return tiny_model(tiny_config)


@pytest.fixture
def data(toy_root, tmp_path):
    """A private copy of the toy dataset (val: images 1, 2, 3, 6, 8) that a test may damage."""
    return shutil.copytree(toy_root, tmp_path / "data")


def predict(model, data, out, proposer=None):
    model.proposer = proposer or GroundTruthProposals()
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(out), callbacks=[PredictionWriter(), OverlayWriter(limit=100)])
    trainer.predict(model, datamodule=ReferDataModule(str(data), split="val", batch_size=2), return_predictions=False)
    return {line["id"]: line for line in read_predictions(out)}


def ground_truth_areas(data):
    dataset = ReferDataset(str(data), split="val", on_bad_image="record")
    return {e.id: int(t.sum()) for s in dataset for e, t in zip(s.expressions, s.targets)}


def expressions_of(data, image_id):
    return [e.id for entry in ReferDataset(str(data), split="val").entries if entry.image_id == image_id
            for e in entry.expressions]


def check_failures(lines, data, out, expected):
    """`expected`: {image_id: (kind, file)}; those images' expressions failed, the others did not."""
    areas = ground_truth_areas(data)
    assert sorted(lines) == sorted(areas)  # every expression has a line: nothing skipped
    failed = {i for image_id in expected for i in expressions_of(data, image_id)}
    for i, line in lines.items():
        if i not in failed:
            assert "failure" not in line
            continue
        kind, file = expected[line["image_id"]]
        assert (line["failure"]["kind"], line["failure"]["file"]) == (kind, str(file))
        assert (line["iou"], line["inter"], line["union"], line["chosen"]) == (0.0, 0, areas[i], -1)
    listed = read_jsonl(out / "failures.jsonl")
    assert sorted(f["id"] for f in listed) == sorted(failed)
    assert all(f["file"] == str(expected[f["image_id"]][1]) and f["error"] for f in listed)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["failures"] == len(failed) and saved["metrics"]["n"] == len(areas)  # counted as IoU 0


def test_bad_images_are_recorded_counted_as_0_and_retried_after_the_fix(model, data, toy_root, tmp_path):
    corrupt, missing, resized = image_path(data, 2), image_path(data, 3), image_path(data, 6)
    corrupt.write_bytes(b"this is not a jpeg" * 20)
    missing.unlink()
    with Image.open(resized) as im:
        im.resize((64, 48)).save(resized)
    out = tmp_path / "run"
    lines = predict(model, data, out)
    check_failures(lines, data, out, {2: ("image", corrupt), 3: ("image", missing), 6: ("image", resized)})
    errors = {line["image_id"]: line["failure"]["error"] for line in lines.values() if "failure" in line}
    assert "Cannot read image" in errors[2] and "replace it with the original" in errors[2]
    assert "Image not found" in errors[3] and "train2014" in errors[3]
    assert "48x64" in errors[6] and "original" in errors[6]
    assert (out / "failures.rank0.jsonl").is_file()

    for image_id in (2, 3, 6):  # fix the files and run the same thing again: only the failures are redone
        shutil.copy(image_path(toy_root, image_id), image_path(data, image_id))
    fixed = predict(model, data, out)
    assert not (out / "failures.jsonl").exists() and not any("failure" in x for x in fixed.values())
    clean = tmp_path / "clean"
    predict(model, data, clean)
    assert json.loads((out / "metrics.json").read_text())["metrics"] == \
        json.loads((clean / "metrics.json").read_text())["metrics"]


def test_bad_proposal_files_are_recorded_and_counted_as_0(model, data, tmp_path):
    store = StoredProposals(tmp_path / "proposals")
    for sample in ReferDataset(str(data), split="val"):
        store.write(sample.image_id, GroundTruthProposals()(sample))
    h, w = ReferDataset(str(data), split="val")[0].size
    store.path(2).unlink()  # missing
    store.path(3).write_text('{"image_id": 3, "height": 9')  # corrupt
    store.write(6, Proposals(torch.zeros(0, h, w, dtype=torch.bool)))  # zero proposals
    store.write(8, Proposals(torch.ones(2, h + 4, w, dtype=torch.bool)))  # not the image's size
    out = tmp_path / "run"
    lines = predict(model, data, out, proposer=store)
    check_failures(lines, data, out, {2: ("proposals", store.path(2)), 3: ("proposals", store.path(3)),
                                      6: ("no_proposals", store.path(6)), 8: ("proposals", store.path(8))})
    errors = {line["image_id"]: line["failure"]["error"] for line in lines.values() if "failure" in line}
    assert "no stored proposals for image 2" in errors[2] and "cache_dir" in errors[2]
    assert "corrupt stored proposals file" in errors[3] and "regenerate" in errors[3]
    assert "0 candidate masks" in errors[6]
    assert "original image resolution" in errors[8]


def test_a_missing_proposals_folder_stops_the_run_naming_it(model, data, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"stored proposals folder {tmp_path / 'nowhere'} does not exist"):
        predict(model, data, tmp_path / "run", proposer=StoredProposals(tmp_path / "nowhere"))


def test_ground_truth_of_the_wrong_size_stops_the_run_naming_the_file(model, data, tmp_path):
    instances = json.loads((data / "refcoco" / "instances.json").read_text())
    ann = next(a for a in instances["annotations"] if a["image_id"] == 2 and isinstance(a["segmentation"], dict))
    h, w = ann["segmentation"]["size"]
    ann["segmentation"]["size"] = [h * 2, w // 2]  # same pixel count, so pycocotools decodes it
    (data / "refcoco" / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(ValueError, match=rf"Annotation {ann['id']} of .*COCO_train2014_000000000002.jpg decodes to "
                                         rf"\({h * 2}, {w // 2}\).*re-extract"):
        predict(model, data, tmp_path / "run")


@pytest.mark.parametrize("text, in_workers", [("", False), ("   ", True), ("\t\n", False)])
def test_an_empty_expression_is_a_recorded_failure_and_the_split_goes_on(model, tiny_config, data, tmp_path, text,
                                                                          in_workers):
    clean = predict(model, data, tmp_path / "clean")
    refs_file = data / "refcoco" / "refs(unc).p"
    refs = pickle.loads(refs_file.read_bytes())
    ref = next(r for r in refs if r["split"] == "val" and len(expressions_of(data, r["image_id"])) > 1
               and clean[r["sentences"][0]["sent_id"]]["iou"] > 0)  # so that failing it changes the scores
    ref["sentences"][0]["raw"] = text
    refs_file.write_bytes(pickle.dumps(refs))
    sent_id, image_id = ref["sentences"][0]["sent_id"], ref["image_id"]
    torch.manual_seed(0)  # the same weights as `model`, parsing in the DataLoader's collate or not
    broken = CoPatch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128, parse_in_workers=in_workers)
    out = tmp_path / "run"
    lines = predict(broken, data, out)

    areas = ground_truth_areas(data)
    assert sorted(lines) == sorted(clean)  # nothing skipped, the split ran to the end
    failed = lines[sent_id]
    assert failed["failure"] == {"kind": "expression", "file": str(image_path(data, image_id)), "error": (
        f"expression {sent_id!r} of image {image_id!r} is empty ({text!r}): there is no word to look for. "
        "Fix or drop it in the dataset's annotations, then rerun the same command.")}
    assert (failed["iou"], failed["inter"], failed["union"], failed["chosen"]) == (0.0, 0, areas[sent_id], -1)
    for i, line in lines.items():  # the other expressions, of that image too, are predicted as before
        if i != sent_id:
            assert "failure" not in line
            assert (line["chosen"], line["inter"], line["union"]) == \
                (clean[i]["chosen"], clean[i]["inter"], clean[i]["union"])
    listed = read_jsonl(out / "failures.jsonl")
    assert [(f["id"], f["image_id"], f["kind"]) for f in listed] == [(sent_id, image_id, "expression")]

    # The metrics, computed here from the clean run's counts with the empty expression at IoU 0.
    inter = {i: 0 if i == sent_id else clean[i]["inter"] for i in clean}
    union = {i: areas[i] if i == sent_id else clean[i]["union"] for i in clean}
    ious = [inter[i] / union[i] if union[i] else 0.0 for i in clean]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["failures"] == 1 and saved["metrics"]["n"] == len(clean)
    assert saved["metrics"]["oIoU"] == pytest.approx(100 * sum(inter.values()) / sum(union.values()))
    assert saved["metrics"]["mIoU"] == pytest.approx(100 * sum(ious) / len(ious))
    assert saved["metrics"]["mIoU"] < json.loads((tmp_path / "clean" / "metrics.json").read_text())["metrics"]["mIoU"]


def test_an_expression_without_a_noun_falls_back_to_the_whole_sentence(tiny_config, toy_root):
    # The spaCy rule takes the whole sentence when neither the root nor its first child is in a noun chunk.
    sample = ReferDataset(str(toy_root), split="val")[1]
    texts = ["very", "on the left", "is big", "?!"][: len(sample.expressions)]
    for expr, text in zip(sample.expressions, texts):
        expr.text = text
    preds = tiny_model(tiny_config).predict_step([sample])
    assert [p.text for p in preds] == texts + [e.text for e in sample.expressions[len(texts):]]
    for p, text in zip(preds, texts):
        assert p.failure is None and p.chosen >= 0 and p.extras["noun_phrase"] == text.replace("?!", "? !")


def test_an_unknown_backbone_name_is_a_clear_error(tiny_run_config, tmp_path):
    from copatch.cli import build_cli

    with pytest.raises(ValueError, match=r"unknown CLIP model name 'ViT-Nope-9'.*open_clip.list_models"):
        build_cli(["predict", "--config", str(tiny_run_config), "--trainer.default_root_dir", str(tmp_path),
                   "--model.clip_config", "null", "--model.clip_model", "ViT-Nope-9"])


def test_a_checkpoint_of_another_architecture_names_the_file(tiny_config, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "tiny-b32.pt"
    torch.save(CoPatch(clip_config=tiny_config, exit_layer=1).backbone.model.state_dict(), weights)
    with pytest.raises(CheckpointError, match=rf"checkpoint {weights} does not fit .*'copatch-tiny'.*Pick the model"):
        CoPatch(clip_model="copatch-tiny", clip_pretrained=str(weights))
