"""The scripts in `examples/` run as a user runs them (`python examples/<name>.py`), on CPU with the
shipped demo CLIP, each in a subprocess under a timeout. (`examples/teacher.py --devices 2` runs in
tests/test_embedding.py.)"""

import json
import re
from pathlib import Path

import pytest

from copatch.overlay import display_scale
from PIL import Image

EXAMPLES = Path(__file__).parents[1] / "examples"
TIMEOUT_S = 120


@pytest.fixture
def run_example(run_python):
    """`run_example(name, *args, cwd=)`: `python examples/<name> ARGS`, which must succeed; its output."""

    def run(name: str, *args: str, cwd) -> str:
        proc = run_python([str(EXAMPLES / name), *args], cwd=cwd, timeout=TIMEOUT_S, what=f"examples/{name}")
        assert proc.returncode == 0, f"examples/{name} failed:\n{proc.stdout[-3000:]}"
        return proc.stdout

    return run


def expression_lines(out: str) -> list[re.Match]:
    return [m for m in (re.match(r"^'(.+)': (proposal|region) (\d+).*?(\d+) pixels, IoU ([\d.]+)", line)
                        for line in out.splitlines()) if m]


def test_single_image(tmp_path, run_example):
    overlay = tmp_path / "overlay.png"
    out = run_example("single_image.py", str(overlay), cwd=tmp_path)
    lines = expression_lines(out)
    assert len(lines) >= 2 and all(int(m.group(4)) > 0 and 0 <= float(m.group(5)) <= 1 for m in lines), out
    with Image.open(overlay) as image:
        # One panel pair per expression, stacked: each `2 s W` wide and `s H` plus its caption band high,
        # the 128 px scene enlarged by the overlay's display scale.
        s = display_scale(128, 128, 256)
        assert s > 1 and image.width == 2 * s * 128 and image.height > len(lines) * s * 128


def test_custom_proposer(tmp_path, run_example):
    out = run_example("custom_proposer.py", cwd=tmp_path)
    found = re.search(r"ColourRegions: (\d+) regions \((\d+) objects", out)
    assert found and int(found.group(1)) >= 2, out  # objects, plus the background
    lines = expression_lines(out)
    assert len(lines) >= 2 and all(m.group(2) == "region" for m in lines), out


def test_teacher(tmp_path, run_example):
    checkpoint = tmp_path / "host.ckpt"
    out = run_example("teacher.py", "--steps", "3", "--checkpoint", str(checkpoint), cwd=tmp_path)
    (result,) = [json.loads(line.split("RESULT ", 1)[1]) for line in out.splitlines() if "RESULT " in line]
    assert result["steps"] == 3 and result["world_size"] == 1
    assert result["trainable"] == ["head.weight", "head.bias"] and result["teacher_stayed_in_eval"]
    assert checkpoint.stat().st_size < 100_000  # the head only: the teacher's 8 M weights stay out
