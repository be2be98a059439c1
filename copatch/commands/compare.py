"""`copatch compare --config ... --methods global_local,hybridgl,copatch [--proposer NAME]`: several
method presets over one dataset and one set of proposals in one pass, one output dir per method, a
Markdown table and a bar chart (the work is `copatch.compare`)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub at run time

HELP = "several methods (global_local, hybridgl, copatch) over the same proposals in one pass: metrics, table, chart"


def main(argv: list[str]) -> int:
    """`copatch compare ...`; returns the exit status."""
    from copatch.compare import main as compare

    return compare(argv)


if __name__ == "__main__":
    from copatch.commands import errors

    sys.exit(errors.run_command(main, sys.argv[1:], prog="copatch compare"))
