"""`copatch evaluate` and the prediction files it reads: torn lines, duplicates, exact metrics."""

import json
import random

import numpy as np
import pytest

from copatch.cli import main
from copatch.evaluate import evaluate_run, metrics_from_lines
from copatch.run_state import (append_jsonl, completed_ids, file_fingerprint, latest_predictions, read_jsonl,
                               read_predictions)


def _line(i, inter, union, oi=None, ou=None, failure=None):
    line = {"id": i, "image_id": i // 3, "inter": inter, "union": union,
            "oracle_inter": inter if oi is None else oi, "oracle_union": union if ou is None else ou}
    if failure:
        line["failure"] = {"kind": failure, "file": f"/data/{i // 3}.jpg", "error": "cannot read it"}
    return line


def _lines(n=40, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        union = rng.randint(0, 500)
        inter = rng.randint(0, union)
        out.append(_line(i, inter, union, oi=union // 2 + inter // 2, ou=union))
    return out


def test_a_torn_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "predictions.rank0.jsonl"
    append_jsonl(path, [{"id": 1}, {"id": 2}])
    with open(path, "a") as f:
        f.write('{"id": 3, "ma')
    assert [r["id"] for r in read_jsonl(path)] == [1, 2]
    assert path.read_text().endswith('"ma')  # reading alone does not change the file
    read_jsonl(path, repair=True)
    assert path.read_text() == '{"id": 1}\n{"id": 2}\n'
    append_jsonl(path, [{"id": 3}])
    assert [r["id"] for r in read_jsonl(path)] == [1, 2, 3]


def test_a_damaged_complete_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "predictions.rank0.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(ValueError, match=r"predictions\.rank0\.jsonl, line 2, is not JSON"):
        read_jsonl(path)


def test_metrics_are_exact_and_do_not_depend_on_how_lines_are_split(tmp_path):
    lines = _lines()
    inter = np.array([x["inter"] for x in lines])
    union = np.array([x["union"] for x in lines])
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    got = metrics_from_lines(lines)
    assert got["n"] == len(lines)
    assert got["oIoU"] == pytest.approx(100 * inter.sum() / union.sum(), abs=1e-12)
    assert got["mIoU"] == pytest.approx(100 * iou.mean(), abs=1e-12)
    assert got["Pr@0.5"] == pytest.approx(100 * (iou >= 0.5).mean(), abs=1e-12)
    assert set(got) == {"oIoU", "mIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "n",
                        "oracle_oIoU", "oracle_mIoU"}
    # Three "ranks" in shuffled order, one duplicated line: bit-identical metrics.
    shuffled = lines[:]
    random.Random(1).shuffle(shuffled)
    for rank in range(3):
        append_jsonl(tmp_path / f"predictions.rank{rank}.jsonl", shuffled[rank::3])
    append_jsonl(tmp_path / "predictions.rank2.jsonl", [shuffled[0]])
    assert evaluate_run(tmp_path).metrics == got


def test_a_retried_failure_is_replaced_by_its_success():
    failed, ok = _line(5, 0, 300, failure="image"), _line(5, 120, 300)
    for order in ([failed, ok], [ok, failed]):
        assert latest_predictions(order)["5"] is ok
    assert completed_ids([failed, _line(6, 1, 2)]) == {"6"}  # a failed expression is computed again


def test_evaluate_writes_metrics_and_failures_and_clears_fixed_failures(tmp_path, capsys):
    lines = _lines(9) + [_line(100, 0, 250, 0, 250, failure="image"), _line(101, 0, 80, 0, 80, failure="proposals")]
    append_jsonl(tmp_path / "predictions.rank0.jsonl", lines)
    main(["evaluate", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "2 of 11 expressions" in printed and "failures.jsonl" in printed
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == metrics_from_lines(lines) and saved["failures"] == 2
    assert saved["metrics"]["n"] == 11  # failures are counted (IoU 0), never skipped
    failures = read_jsonl(tmp_path / "failures.jsonl")
    assert [(f["id"], f["kind"], f["file"]) for f in failures] == [(100, "image", "/data/33.jpg"),
                                                                   (101, "proposals", "/data/33.jpg")]
    # Rerun after fixing the files: the successes replace the failures.
    append_jsonl(tmp_path / "predictions.rank0.jsonl", [_line(100, 200, 250), _line(101, 70, 80)])
    evaluate_run(tmp_path)
    assert not (tmp_path / "failures.jsonl").exists()
    assert len(read_predictions(tmp_path)) == 13


def test_evaluate_of_a_dir_without_predictions_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["evaluate", str(tmp_path)])
    assert done.value.code == 2
    assert f"no predictions.rank*.jsonl in {tmp_path}" in capsys.readouterr().err


def test_weights_are_fingerprinted_by_content(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    data = bytes(range(256)) * 9000  # > 2 MiB: head and tail hashed
    a.write_bytes(data)
    b.write_bytes(data[:-1] + b"\x00")
    assert file_fingerprint(str(a)) != file_fingerprint(str(b))
    (tmp_path / "sub").mkdir()
    c = tmp_path / "sub" / "a.bin"
    c.write_bytes(data)
    assert file_fingerprint(str(a)) == file_fingerprint(str(c))
    assert file_fingerprint("openai") == {"tag": "openai"} and file_fingerprint(None) is None
