"""CPU smoke run of benchmarks/throughput.py: both paths run and pick the same masks (not timed)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "throughput.py"


def test_throughput_benchmark_smoke(capsys):
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--images", "2", "--expressions", "4", "--proposals", "12", "--size", "48x64",
                          "--batch-size", "2"])
    assert results["reference"]["picks"] == results["copatch"]["picks"]
    assert len(results["copatch"]["picks"]) == 8
    assert "picked the same mask for all 8 expressions" in capsys.readouterr().out
