"""BENCHMARKS.md sections, shared by the bench scripts: `make bench` runs bench.py (which
rewrites the file), then each later script replaces its own section (up to the next `## `
heading) or appends it, so any one script can be run alone without losing the others'."""

from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(heading: str, lines: list[str]) -> None:
    """Print the section and put it in BENCHMARKS.md in place of any older copy (the old
    section ends at the next '## ' heading), else at the end. `heading` is the section's
    '## ...' line without the '## '."""
    text = "\n".join(["", f"## {heading}", *lines])
    print(text)
    old = BENCH.read_text() if BENCH.exists() else "# Benchmarks\n"
    marker = f"\n## {heading.split(':')[0].split(' (')[0]}"
    if marker in old:
        start = old.index(marker)
        nxt = old.find("\n## ", start + len(marker))
        rest = old[nxt:] if nxt >= 0 else ""
        BENCH.write_text(old[:start].rstrip("\n") + "\n" + text.rstrip("\n") + "\n" + rest)
    else:
        BENCH.write_text(old.rstrip("\n") + "\n" + text)
