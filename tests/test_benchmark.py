"""CPU smoke runs of benchmarks/throughput.py: both paths run and pick the same masks (never timed)."""

from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "throughput.py"


def test_throughput_benchmark_smoke_with_stored_proposals(capsys, load_script):
    results = load_script(SCRIPT).main(["--images", "2", "--expressions", "4", "--proposals", "12", "--size", "48x64",
                             "--batch-size", "2", "--profile", "5"])
    assert results["reference"]["picks"] == results["copatch"]["picks"]
    assert len(results["copatch"]["picks"]) == 8
    out = capsys.readouterr().out
    assert "picked the same mask for all 8 expressions" in out
    assert "peak memory" in out and "GiB RSS" in out
    # The profile names the stages: the image side once per image, CoMap once per expression, and the
    # picks of all an image's expressions at once, on the device; GEM once per batch.
    rows = {line.split()[0]: line.split()[1:] for line in results["profile"].splitlines()
            if line.startswith("copatch.")}
    assert rows["copatch.image_side"][0] == "2" and rows["copatch.comap"][0] == "8"
    assert rows["copatch._predict_expressions_on_device"][0] == "2" and rows["copatch.gem_together"][0] == "1"


def test_throughput_benchmark_smoke_with_mask2former(capsys, load_script):
    pytest.importorskip("transformers")
    results = load_script(SCRIPT).main(["--images", "3", "--expressions", "3", "--size", "40x56", "--batch-size", "3",
                             "--proposer", "mask2former", "--m2f", "tiny", "--m2f-min-size", "64",
                             "--m2f-max-size", "96", "--workers", "1"])
    assert results["reference"]["picks"] == results["copatch"]["picks"]
    assert "picked the same mask for all 9 expressions" in capsys.readouterr().out


def test_throughput_benchmark_writes_json_and_a_cache(tmp_path, load_script):
    """`--cache-dir` writes every image's entry (background writer) and `--json` records each mode."""
    pytest.importorskip("transformers")
    import json

    out, cache = tmp_path / "run.json", tmp_path / "cache"
    load_script(SCRIPT).main(["--images", "2", "--expressions", "2", "--size", "40x56", "--batch-size", "2",
                              "--proposer", "mask2former", "--m2f", "tiny", "--m2f-queries", "12",
                              "--m2f-min-size", "64", "--m2f-max-size", "96", "--cache-dir", str(cache),
                              "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["planned"] == ["copatch", "reference"] and set(record["modes"]) == {"copatch", "reference"}
    assert record["modes"]["copatch"]["same_picks"] == 4 and record["setup"]["cache"] == "background"
    # One fresh folder per copatch run (the warm-up and the timed run), each holding every image it ran.
    runs = sorted(p for p in cache.iterdir())
    assert len(runs) == 2
    entries = [sorted(f.name for f in run.glob("*/*.json") if f.name != "settings.json") for run in runs]
    assert sorted(entries, key=len) == [["0.json"], ["0.json", "1.json"]]


@pytest.mark.slow
def test_gpu_script_runs_on_the_cpu_and_writes_one_table(tmp_path):
    """`benchmarks/gpu.sh --device cpu --quick`: both runs, every planned mode, one table and its JSON."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "bench"
    script = Path(__file__).parents[1] / "benchmarks" / "gpu.sh"
    proc = subprocess.run(["bash", str(script), "--device", "cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads((out / "gpu.json").read_text())
    modes = [(r["proposals"].split(",")[0], r["mode"]) for r in table["rows"]]
    assert modes == [("stored", "copatch"), ("stored", "copatch-bf16"), ("stored", "reference"),
                     ("Mask2Former tiny", "copatch"), ("Mask2Former tiny", "copatch-bf16"),
                     ("Mask2Former tiny", "reference"), ("Mask2Former tiny", "copatch-bf16-compile")]
    for row in table["rows"]:
        assert "note" not in row, row
        assert row["expressions/s"] > 0 and row["images/s"] > 0 and row["peak_memory_bytes"] > 0
        assert row["card"].startswith("CPU")
    fp32 = [r for r in table["rows"] if r["mode"] == "copatch"]
    assert [r["picks agree"] for r in fp32] == ["yes, all 4", "yes, all 4"]
    assert all(r["vs reference"].endswith("x") for r in fp32)
    printed = proc.stdout
    assert table["table"] in printed and "| card | proposals | CLIP | mode | expressions/s" in printed
    assert not (out / "cache").exists()
