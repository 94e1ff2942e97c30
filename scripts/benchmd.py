"""BENCHMARKS.md sections, shared by the bench scripts: `make bench` runs bench.py (which
rewrites the file), then each later script replaces its own section and everything after it,
so running them in the Makefile's order leaves every section exactly once."""

from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(heading: str, lines: list[str]) -> None:
    """Print the section and put it in BENCHMARKS.md in place of any older copy (and of what
    followed it). `heading` is the section's '## ...' line without the '## '."""
    text = "\n".join(["", f"## {heading}", *lines])
    print(text)
    old = BENCH.read_text() if BENCH.exists() else "# Benchmarks\n"
    marker = f"\n## {heading.split(':')[0].split(' (')[0]}"
    if marker in old:
        old = old[: old.index(marker)]
    BENCH.write_text(old.rstrip("\n") + "\n" + text)
