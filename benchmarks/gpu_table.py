"""One table from the JSON files of `benchmarks/throughput.py --json` (what `benchmarks/gpu.sh` runs).

    python benchmarks/gpu_table.py outputs/gpu-bench/stored.json outputs/gpu-bench/mask2former.json \
        --json outputs/gpu-bench/gpu.json

Per mode of each run: the card, the setup (proposals, CLIP), expressions/s, images/s, peak memory (GPU
`max_memory_allocated`, or the CPU RSS), the speed-up over the reference loop and whether the picks
agree (copatch fp32 with the reference loop: all must; bf16 and compile with copatch fp32: how many).
A mode a run planned but did not finish (time limit, crash) is listed as such, and a missing file as a
run with no results. Prints the table as Markdown; `--json OUT` writes the rows and the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

COLUMNS = ["card", "proposals", "CLIP", "mode", "expressions/s", "images/s", "peak memory", "vs reference",
           "picks agree"]


def _proposals(setup: dict) -> str:
    if setup.get("proposer") == "mask2former":
        text = f"Mask2Former {setup.get('proposals')}, on the fly"
        return text + (f", cache written ({setup['cache']})" if setup.get("cache") else "")
    return f"stored, {setup.get('proposals')} per image"


def _agree(row: dict, n: int) -> str:
    if "same_picks" not in row:
        return "-"
    same, whom = row["same_picks"], row.get("picks_compared_with", "?")
    if whom == "reference":
        return f"yes, all {n}" if same == n else f"NO: {same}/{n} as the reference"
    return f"{same}/{n} as fp32"


def rows_of(path: Path) -> tuple[list[dict], dict | None]:
    """The table rows of one run file (and the run record; None when the file is missing or unreadable)."""
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return [{"card": "?", "proposals": path.stem, "CLIP": "?", "mode": "-",
                 "note": f"no results ({type(err).__name__}: the run did not start or was stopped early)"}], None
    setup, modes, n = run.get("setup", {}), run.get("modes", {}), run.get("setup", {}).get("expressions", 0)
    base = {"card": run.get("card", "?"), "proposals": _proposals(setup), "CLIP": setup.get("clip", "?")}
    rows = []
    for name in [*run.get("planned", []), *(m for m in modes if m not in run.get("planned", []))]:
        row = modes.get(name)
        if row is None:
            rows.append({**base, "mode": name, "note": "not finished (time limit or crash: see the log)"})
        elif "error" in row:
            rows.append({**base, "mode": name, "note": f"failed: {row['error']}"})
        else:
            rows.append({**base, "mode": name, "expressions/s": round(row["expressions_per_s"], 2),
                         "images/s": round(row["images_per_s"], 2), "peak memory": row["peak_memory"],
                         "peak_memory_bytes": row["peak_memory_bytes"],
                         "vs reference": (f"{row['speedup_vs_reference']:.1f}x" if "speedup_vs_reference" in row
                                          else "-"),
                         "picks agree": _agree(row, n), "seconds": round(row["seconds"], 2)})
    return rows, run


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if "note" in row:
            cells = [str(row.get(c, "")) for c in COLUMNS[:4]] + [row["note"]] + [""] * (len(COLUMNS) - 5)
        else:
            cells = [str(row.get(c, "")) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files of throughput.py --json")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the rows and the runs as JSON")
    args = parser.parse_args(argv)
    rows, runs = [], []
    for path in args.runs:
        got, run = rows_of(path)
        rows.extend(got)
        runs.append({"file": str(path), "run": run})
    table = markdown(rows)
    print(table)
    record = {"rows": rows, "runs": runs, "table": table}
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, args.json)
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
