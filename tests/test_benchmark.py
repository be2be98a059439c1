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
    # The profile names the stages: the image side once per image, the pick once per expression.
    rows = {line.split()[0]: line.split()[1:] for line in results["profile"].splitlines()
            if line.startswith("copatch.")}
    assert rows["copatch.image_side"][0] == "2" and rows["copatch.pick"][0] == "8"


def test_throughput_benchmark_smoke_with_mask2former(capsys, load_script):
    pytest.importorskip("transformers")
    results = load_script(SCRIPT).main(["--images", "3", "--expressions", "3", "--size", "40x56", "--batch-size", "3",
                             "--proposer", "mask2former", "--m2f", "tiny", "--m2f-min-size", "64",
                             "--m2f-max-size", "96", "--workers", "1"])
    assert results["reference"]["picks"] == results["copatch"]["picks"]
    assert "picked the same mask for all 9 expressions" in capsys.readouterr().out
