"""A run killed halfway and rerun with the same command gives exactly the uninterrupted run's results,
computing only what was missing; another setup in the same output dir is refused."""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter

import pytest
import torch

from copatch.cli import build_cli, main
from copatch.module import CoPatch
from copatch.run_state import RunMismatchError, check_run, differences, prediction_files, read_jsonl

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

# Runs `copatch` and SIGKILLs itself right after the writer has flushed batch N, leaving a torn line,
# as a kill in the middle of the next write would.
KILL_SCRIPT = """
import os, signal, sys
from copatch.callbacks.prediction_writer import PredictionWriter
from copatch.cli import main

after = int(os.environ["KILL_AFTER_BATCHES"])
write = PredictionWriter.write_on_batch_end
written = []

def write_then_die(self, trainer, *args):
    write(self, trainer, *args)
    written.append(1)
    if len(written) == after:
        with open(self.path(trainer), "a") as f:
            f.write('{"id": 999, "image_id": 7, "chosen": 1, "inter')
        os.kill(os.getpid(), signal.SIGKILL)

PredictionWriter.write_on_batch_end = write_then_die
main(sys.argv[1:])
"""


def lines(out) -> list[dict]:
    return [line for path in prediction_files(out) for line in read_jsonl(path)]


def metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())["metrics"]


def count_computed(monkeypatch) -> list[int]:
    """Expressions that reach `predict_image` from now on (one entry per image)."""
    computed: list[int] = []
    real = CoPatch.predict_image

    def counting(self, sample):
        computed.append(len(sample.expressions))
        return real(self, sample)

    monkeypatch.setattr(CoPatch, "predict_image", counting)
    return computed


def test_killed_run_resumes_to_exactly_the_uninterrupted_result(tiny_run_config, reference_run, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "run"
    args = ["predict", "--config", str(tiny_run_config), "--trainer.default_root_dir", str(out)]
    script = tmp_path / "kill_after.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KILL_AFTER_BATCHES": "2"}
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "metrics.json").exists()
    path = out / "predictions.rank0.jsonl"
    assert not path.read_text().endswith("\n")  # the torn line is there
    # A kill in the middle of a batch's write: keep part of the second image of batch 2.
    kept = path.read_text().split("\n")[:-1]
    path.write_text("\n".join(kept[:-2]) + "\n" + '{"id": 17, "tex')
    before = len(read_jsonl(path))
    total = len(lines(reference_run))
    assert 0 < before < total

    computed = count_computed(monkeypatch)
    main(args)  # the same command again

    assert sum(computed) == total - before  # only what was missing
    ids = Counter(line["id"] for line in lines(out))
    assert sorted(ids) == sorted(line["id"] for line in lines(reference_run)) and set(ids.values()) == {1}
    assert metrics(out) == metrics(reference_run)  # exactly
    resumed = {line["id"]: line for line in lines(out)}
    for line in lines(reference_run):
        got = resumed[line["id"]]
        assert (got["chosen"], got["inter"], got["union"], got["mask"]) == \
            (line["chosen"], line["inter"], line["union"], line["mask"])

    # `copatch evaluate` recomputes the same metrics, from the counts and from masks + ground truth.
    os.remove(out / "metrics.json")
    main(["evaluate", str(out)])
    assert metrics(out) == metrics(reference_run)
    main(["evaluate", str(out), "--ground-truth", "--no-write"])


def test_resume_reads_every_rank_of_an_earlier_run_of_another_world_size(tiny_run_config, reference_run,
                                                                         tmp_path, monkeypatch):
    # What a killed 2-process run leaves: two rank files (one with a torn line) and its run.json.
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(reference_run / "run.json", out / "run.json")
    done = lines(reference_run)[:9]
    (out / "predictions.rank0.jsonl").write_text("".join(json.dumps(x) + "\n" for x in done[0::2]))
    (out / "predictions.rank1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in done[1::2]) + '{"id"')
    computed = count_computed(monkeypatch)
    build_cli(["predict", "--config", str(tiny_run_config), "--trainer.default_root_dir", str(out)])
    assert sum(computed) == len(lines(reference_run)) - len(done)
    assert metrics(out) == metrics(reference_run)


def test_another_setup_in_the_same_output_dir_is_refused(tiny_run_config, reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(RunMismatchError, match=r"model\.hparams\.delta: 0\.3 -> 0\.4.*default_root_dir") as err:
        build_cli(["predict", "--config", str(tiny_run_config), "--trainer.default_root_dir", str(out),
                   "--model.delta", "0.4"])
    assert str(out) in str(err.value)
    assert (out / "config.yaml").read_text() == config_before  # the refused run changed nothing
    with pytest.raises(RunMismatchError, match=r"data\.hparams\.split: val -> testA"):
        build_cli(["predict", "--config", str(tiny_run_config), "--trainer.default_root_dir", str(out),
                   "--data.init_args.split", "testA"])
    # Settings that do not change a prediction may differ.
    build_cli(["predict", "--config", str(tiny_run_config), "--trainer.default_root_dir", str(out),
               "--data.init_args.batch_size", "3"])


def test_a_checkpoint_change_is_refused(tiny_config, tmp_path):
    torch.manual_seed(0)
    model = CoPatch(clip_config=tiny_config, exit_layer=1)
    first, second, moved = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "elsewhere" / "a.pt"
    state = model.backbone.model.state_dict()
    torch.save(state, first)
    state["logit_scale"] = state["logit_scale"] + 1
    torch.save(state, second)
    moved.parent.mkdir()
    shutil.copy(first, moved)
    fingerprints = [CoPatch(clip_config=tiny_config, clip_pretrained=str(p), exit_layer=1).fingerprint()
                    for p in (first, second, moved)]
    assert fingerprints[0] == fingerprints[2]  # the same weights at another path are the same setup
    diff = differences(fingerprints[0], fingerprints[1])
    assert diff and all(d.startswith("hparams.clip_pretrained.") for d in diff), diff
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"fingerprint": {"model": fingerprints[0]}}))
    check_run(out, {"model": fingerprints[2]})
    with pytest.raises(RunMismatchError, match=r"model\.hparams\.clip_pretrained\.sha256_head_tail"):
        check_run(out, {"model": fingerprints[1]})


def test_predictions_without_run_json_are_refused(tmp_path):
    (tmp_path / "predictions.rank0.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(RunMismatchError, match="no run.json"):
        check_run(tmp_path, {})


def _one_line_per_expression(out) -> dict:
    found = lines(out)
    ids = Counter(str(line["id"]) for line in found)
    assert set(ids.values()) == {1}, [k for k, n in ids.items() if n > 1]
    return {str(line["id"]): line for line in found}


def test_reruns_that_retry_and_fix_a_failed_image_leave_one_line_each_and_failures_match_metrics(
        tiny_run_config, reference_run, tmp_path, monkeypatch):
    import yaml

    data = tmp_path / "data"
    shutil.copytree(yaml.safe_load(tiny_run_config.read_text())["data"]["init_args"]["root"], data)
    reference = {str(line["id"]): line for line in lines(reference_run)}
    image_id = next(iter(reference.values()))["image_id"]
    broken_ids = sorted(k for k, line in reference.items() if line["image_id"] == image_id)
    image = data / "images" / "mscoco" / "images" / "train2014" / f"COCO_train2014_{image_id:012d}.jpg"
    good = image.read_bytes()
    out = tmp_path / "run"
    args = ["predict", "--config", str(tiny_run_config), "--trainer.default_root_dir", str(out),
            "--data.init_args.root", str(data)]

    def saved() -> tuple[dict, list[dict], list[dict]]:
        return (json.loads((out / "metrics.json").read_text()), read_jsonl(out / "failures.jsonl"),
                read_jsonl(out / "failures.rank0.jsonl"))

    image.write_bytes(b"not an image")  # unreadable
    assert main(args) == 0
    first, failures, logged = saved()
    assert sorted(str(f["id"]) for f in failures) == broken_ids == sorted(str(f["id"]) for f in logged)
    assert first["failures"] == len(failures)
    first_errors = {f["error"] for f in failures}

    image.unlink()  # still broken, another way: the retry's error is the one listed, once
    computed = count_computed(monkeypatch)
    assert main(args) == 0
    assert sum(computed) == len(broken_ids)  # only the failed expressions were computed again
    written = _one_line_per_expression(out)
    assert all(written[k]["attempt"] == 2 for k in broken_ids)
    second, failures, logged = saved()
    assert sorted(str(f["id"]) for f in failures) == broken_ids and second["failures"] == len(failures)
    assert not {f["error"] for f in failures} & first_errors  # the retry's error, not the stale one
    assert [f["error"] for f in failures] == [f["error"] for f in logged]

    image.write_bytes(good)  # fixed: the failures are gone from every file, the metrics are the full run's
    computed.clear()
    assert main(args) == 0
    assert sum(computed) == len(broken_ids)
    written = _one_line_per_expression(out)
    assert sorted(written) == sorted(reference) and not any(line.get("failure") for line in written.values())
    assert all(written[k]["attempt"] == 3 for k in broken_ids)
    final = json.loads((out / "metrics.json").read_text())
    assert final["failures"] == 0 and final["metrics"] == metrics(reference_run)
    assert not (out / "failures.jsonl").exists() and read_jsonl(out / "failures.rank0.jsonl") == []
