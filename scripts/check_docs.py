#!/usr/bin/env python3
"""Checks that the repository's documentation is self-contained and that its cross-references
resolve. Run from anywhere: ``python3 scripts/check_docs.py``; exit status 1 on any failure.

1. No tracked file mentions the design notes that live outside the repository (the parent
   directory's ``shared`` design folder, or the old name of the WAL spec): a reader of a clone
   cannot follow such a pointer. docs/WAL.md is the protocol's home now.
2. Every citation of a docs/WAL.md section (``WAL.md §C.6``, ``§E.2, §C.4``, ``§G15``; a ``§``
   followed by a capital letter is always a WAL.md section, FORMAT.md's are numbers) names an
   id that exists there as a heading (``### C.6 …``) or an anchor (``<a id="G15">``), and each
   id is defined once. A citation written without the ``§`` (the file name, a space, ``D.7``)
   fails too, so the form stays greppable.
3. Every citation of a docs/FORMAT.md section written as ``FORMAT.md §3.4`` (and the ``§``
   numbers that follow it in the same list) names a numbered heading of FORMAT.md. Bare
   numbers such as ``(§3.1)`` are not checked: RFC sections use the same notation.
4. Every markdown link in a tracked ``.md`` file that points into the repository (not a URL,
   not a bare ``#anchor``) names a file or directory that exists, and a ``#fragment`` into a
   markdown file names one of its headings or anchors.

Prints what it checked and a summary line ``N passed, M failed``.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(
    subprocess.run(
        ["git", "rev-parse", "--show-toplevel"],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
)

# Spelled in pieces so that this file does not match its own check.
OUTSIDE = [".." + "/shared", "shared" + "/design", "wal" + "-spec"]

WAL_MD = "docs/WAL.md"
FORMAT_MD = "docs/FORMAT.md"

# A WAL.md section id: a part letter, optionally ".n" (A.1) or a test number (G15).
WAL_ID = r"[A-Z](?:\.\d+|\d+)?"
WAL_CITE = re.compile(r"§(" + WAL_ID + r")(?![\w.]*\w)")
# A WAL.md citation without the section sign.
WAL_BARE = re.compile(r"WAL\.md,?\s+(" + WAL_ID + r")\b(?!\.md)")
# "FORMAT.md §3.4" and the section numbers listed right after it ("§3.1–§3.3", "§6, §7").
FORMAT_CITE = re.compile(r"FORMAT\.md,?\s*((?:§\d+(?:\.\d+)*(?:\s*(?:,|–|-|/|and|or)\s*)?)+)")
FORMAT_NUM = re.compile(r"§(\d+(?:\.\d+)*)")
MD_LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
MD_REF = re.compile(r"^\s*\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")


class Checks:
    def __init__(self):
        self.passed = 0
        self.failures = []

    def ok(self):
        self.passed += 1

    def fail(self, msg):
        self.failures.append(msg)


def tracked_text_files():
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    for name in out.decode().split("\0"):
        if not name:
            continue
        p = ROOT / name
        if not p.is_file():
            continue  # deleted in the work tree, or a submodule
        data = p.read_bytes()
        if b"\0" in data:
            continue  # binary (fuzz corpora)
        try:
            yield name, data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def markdown_lines(text):
    """(line number, line) outside fenced code blocks, with inline code spans blanked."""
    fence = None
    for n, line in enumerate(text.split("\n"), 1):
        m = re.match(r"^\s*(```+|~~~+)", line)
        if m:
            if fence is None:
                fence = m.group(1)[0] * 3
            elif m.group(1).startswith(fence):
                fence = None
            continue
        if fence is None:
            yield n, re.sub(r"`[^`]*`", "``", line)


def github_slug(heading):
    s = heading.strip().lower()
    s = re.sub(r"<[^>]+>", "", s)
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors_of(text):
    """Heading slugs and explicit anchor ids of a markdown text."""
    found = set()
    for _, line in markdown_lines(text):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            found.add(github_slug(m.group(1)))
    for m in re.finditer(r"<a\s+(?:id|name)=\"([^\"]+)\"", text):
        found.add(m.group(1))
    return found


def wal_ids(text, checks):
    """Section ids of WAL.md: headings "## A. …", "### A.1 …", and <a id="G15"> anchors."""
    ids = {}
    for n, line in enumerate(text.split("\n"), 1):
        m = re.match(r"^#{2,6}\s+(" + WAL_ID + r")\.?\s", line)
        if m:
            ids.setdefault(m.group(1), []).append(n)
        for a in re.finditer(r"<a\s+id=\"(" + WAL_ID + r")\"", line):
            ids.setdefault(a.group(1), []).append(n)
    for i, lines in sorted(ids.items()):
        if len(lines) > 1:
            checks.fail(f"{WAL_MD}: section id {i} is defined {len(lines)} times (lines {lines})")
    return set(ids)


def format_ids(text):
    ids = set()
    for line in text.split("\n"):
        m = re.match(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", line)
        if m:
            ids.add(m.group(1))
    return ids


def main():
    files = dict(tracked_text_files())
    results = []

    # 1. Nothing points outside the repository.
    c1 = Checks()
    for name, text in files.items():
        bad = False
        for n, line in enumerate(text.split("\n"), 1):
            for s in OUTSIDE:
                if s in line:
                    c1.fail(f"{name}:{n}: mentions {s!r} (design notes outside the repository): {line.strip()[:120]}")
                    bad = True
        if not bad:
            c1.ok()
    results.append((f"no tracked file mentions {', '.join(OUTSIDE)} ({len(files)} text files)", c1))

    # 2. WAL.md section citations resolve.
    c2 = Checks()
    if WAL_MD not in files:
        c2.fail(f"{WAL_MD} is missing")
        ids = set()
    else:
        ids = wal_ids(files[WAL_MD], c2)
    for name, text in files.items():
        for n, line in enumerate(text.split("\n"), 1):
            for m in WAL_CITE.finditer(line):
                if m.group(1) in ids:
                    c2.ok()
                else:
                    c2.fail(f"{name}:{n}: cites WAL.md §{m.group(1)}, which {WAL_MD} does not define")
            for m in WAL_BARE.finditer(line):
                c2.fail(f"{name}:{n}: cite as 'WAL.md §{m.group(1)}' (with the section sign): {line.strip()[:120]}")
    results.append((f"WAL.md section citations name one of its {len(ids)} section ids", c2))

    # 3. FORMAT.md section citations resolve.
    c3 = Checks()
    fids = format_ids(files.get(FORMAT_MD, ""))
    if not fids:
        c3.fail(f"{FORMAT_MD} is missing or has no numbered headings")
    for name, text in files.items():
        for n, line in enumerate(text.split("\n"), 1):
            for m in FORMAT_CITE.finditer(line):
                for num in FORMAT_NUM.findall(m.group(1)):
                    if num in fids:
                        c3.ok()
                    else:
                        c3.fail(f"{name}:{n}: cites FORMAT.md §{num}, which {FORMAT_MD} does not define")
    results.append((f"FORMAT.md section citations name one of its {len(fids)} numbered sections", c3))

    # 4. Markdown links into the repository resolve.
    c4 = Checks()
    anchor_cache = {}
    md_files = [n for n in files if n.endswith(".md")]
    for name in md_files:
        base = (ROOT / name).parent
        for n, line in markdown_lines(files[name]):
            targets = [m.group(1) for m in MD_LINK.finditer(line)]
            r = MD_REF.match(line)
            if r:
                targets.append(r.group(1))
            for t in targets:
                if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) or t.startswith("#"):
                    continue  # a URL (http:, mailto:) or an anchor in the same page
                path, _, frag = t.partition("#")
                target = (base / path).resolve()
                try:
                    rel = target.relative_to(ROOT)
                except ValueError:
                    c4.fail(f"{name}:{n}: link {t!r} leaves the repository")
                    continue
                if not target.exists():
                    c4.fail(f"{name}:{n}: link {t!r}: {rel} does not exist")
                    continue
                if frag and target.suffix == ".md":
                    key = str(rel)
                    if key not in anchor_cache:
                        anchor_cache[key] = anchors_of(target.read_text(encoding="utf-8"))
                    if frag not in anchor_cache[key] and frag.lower() not in anchor_cache[key]:
                        c4.fail(f"{name}:{n}: link {t!r}: {rel} has no heading or anchor {frag!r}")
                        continue
                c4.ok()
    results.append((f"markdown links into the repository resolve ({len(md_files)} .md files)", c4))

    passed = sum(c.passed for _, c in results)
    failed = sum(len(c.failures) for _, c in results)
    for what, c in results:
        status = "ok" if not c.failures else "FAILED"
        print(f"check_docs: {status:6} {what}: {c.passed} passed, {len(c.failures)} failed")
        for f in c.failures:
            print(f"  {f}")
    print(f"check_docs: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
