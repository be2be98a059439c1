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
    assert main(["evaluate", str(tmp_path)]) == 2
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


def test_the_final_line_is_the_success_then_the_latest_attempt_whatever_file_holds_it(tmp_path):
    from copatch.run_state import attempts, final_lines

    old = _line(7, 0, 90, failure="image")  # attempt 1 (unsaid), from a 2-rank run: rank 1's file
    retried = {**_line(7, 0, 90, failure="proposals"), "attempt": 2}  # a 1-rank retry: rank 0's file
    append_jsonl(tmp_path / "predictions.rank0.jsonl", [retried])
    append_jsonl(tmp_path / "predictions.rank1.jsonl", [old])
    assert final_lines(read_predictions(tmp_path))["7"] == retried  # not the first read, the latest attempt
    assert attempts(read_predictions(tmp_path)) == {"7": 2}
    evaluation = evaluate_run(tmp_path)
    assert [f["kind"] for f in evaluation.failures] == ["proposals"]
    assert [f["kind"] for f in read_jsonl(tmp_path / "failures.jsonl")] == ["proposals"]
    ok = {**_line(7, 40, 90), "attempt": 1}  # a success wins over any failure
    assert final_lines([retried, ok, {**old, "attempt": 5}])["7"] is ok


def test_compaction_keeps_exactly_the_final_lines_and_is_safe_to_interrupt(tmp_path, monkeypatch):
    import copatch.run_state as run_state
    from copatch.failures import failure_line
    from copatch.run_state import compact_predictions, final_lines

    lines = _lines(12)
    failed = [{**_line(i, 0, 50, failure="image"), "attempt": 1} for i in (3, 8)]
    refailed = {**_line(8, 0, 50, failure="proposals"), "attempt": 2}
    # A 2-rank run where ids 3 and 8 failed, then a 1-rank rerun: 3 is fixed, 8 fails again.
    append_jsonl(tmp_path / "predictions.rank0.jsonl", [failed[0]] + [x for x in lines[0::2] if x["id"] != 8])
    append_jsonl(tmp_path / "predictions.rank1.jsonl", [failed[1]] + [x for x in lines[1::2] if x["id"] != 3])
    append_jsonl(tmp_path / "predictions.rank0.jsonl", [refailed, lines[3]])
    append_jsonl(tmp_path / "failures.rank0.jsonl", [failure_line(failed[0]), failure_line(refailed)])
    append_jsonl(tmp_path / "failures.rank1.jsonl", [failure_line(failed[1])])
    with open(tmp_path / "predictions.rank1.jsonl", "a") as f:
        f.write('{"id": 99, "tor')
    expected = final_lines(read_predictions(tmp_path))
    metrics = evaluate_run(tmp_path, write=False).metrics

    # Killed after the first file was replaced: the final lines and the metrics are the same.
    real, calls = run_state.atomic_write_text, []

    def write_once_then_die(path, text):
        if calls:
            raise KeyboardInterrupt
        calls.append(path)
        real(path, text)

    monkeypatch.setattr(run_state, "atomic_write_text", write_once_then_die)
    with pytest.raises(KeyboardInterrupt):
        compact_predictions(tmp_path)
    assert final_lines(read_predictions(tmp_path)) == expected
    assert evaluate_run(tmp_path, write=False).metrics == metrics
    monkeypatch.setattr(run_state, "atomic_write_text", real)

    assert [p.name for p in calls] == ["predictions.rank0.jsonl"]  # its superseded line of id 3 is gone
    assert compact_predictions(tmp_path) == 1  # rank 1's superseded line of id 8
    assert compact_predictions(tmp_path) == 0
    after = read_predictions(tmp_path)
    assert len(after) == len({str(x["id"]) for x in after}) == 12
    assert final_lines(after) == expected and evaluate_run(tmp_path, write=False).metrics == metrics
    assert (tmp_path / "predictions.rank1.jsonl").read_text().endswith("\n")  # the torn line is gone
    assert read_jsonl(tmp_path / "failures.rank0.jsonl") == [failure_line(refailed)]
    assert read_jsonl(tmp_path / "failures.rank1.jsonl") == []


def test_files_written_whole_have_the_mode_of_the_others(tmp_path):
    import os
    import stat

    from copatch.run_state import write_run

    old = os.umask(0o022)
    try:
        append_jsonl(tmp_path / "predictions.rank0.jsonl", _lines(4) + [_line(9, 0, 5, failure="image")])
        evaluate_run(tmp_path)
        write_run(tmp_path, {"model": {}}, {})
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        assert modes == {"predictions.rank0.jsonl": 0o644, "metrics.json": 0o644, "failures.jsonl": 0o644,
                         "run.json": 0o644}
        os.umask(0o027)  # and they follow the umask, as open() does
        evaluate_run(tmp_path)
        assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)
