"""`copatch evaluate OUTPUT_DIR [--ground-truth] [--no-write]`: a run's metrics recomputed from its
prediction files (the work is `copatch.evaluate`)."""

from __future__ import annotations

HELP = "recompute a run's metrics from its prediction files (--ground-truth: against the dataset)"


def main(argv: list[str]) -> int:
    """`copatch evaluate ...`; returns the exit status."""
    from copatch.evaluate import main as evaluate

    return evaluate(argv)
