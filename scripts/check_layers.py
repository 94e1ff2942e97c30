#!/usr/bin/env python3
"""Check that src/ imports point down the layer order of docs/ARCHITECTURE.md.

Reads every src/**/*.rs file (tests and the `bin/` crate excluded), collects the arrows
`file -> file` from `use crate::...` items and `crate::x::...` paths in code, and fails when

* an arrow goes from a top-level module to one in a HIGHER layer (upward), or
* the files import each other in a cycle (any length, across or inside modules).

Arrows inside one layer are allowed (they still take part in the cycle check). The layer
order below is the one in docs/ARCHITECTURE.md: keep the two in step.

Usage: scripts/check_layers.py [--quiet]   (exit status 1 on a violation)
"""

import os
import re
import sys

# Bottom to top. A module may import modules of its own layer or of any layer below.
LAYERS = [
    ("foundation", ["types", "error", "util", "config", "logging"]),
    ("formats and host", ["wal", "txlog", "sys", "ffi"]),
    ("shim", ["vfs"]),
    ("transport", ["transport"]),
    ("roles", ["primary", "replica"]),
    ("registry", ["roles", "failover"]),
    ("SQL adapters", ["functions"]),
    ("entry", ["entry"]),
]

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
SKIP_DIRS = {"bin", "tests"}
LAYER_OF = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}


def rust_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = os.path.relpath(dirpath, ROOT)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for f in sorted(filenames):
            if not f.endswith(".rs") or f.endswith("_tests.rs") or f == "tests.rs":
                continue
            path = os.path.normpath(os.path.join(rel, f))
            if path == "lib.rs":
                continue
            yield path


def strip_noise(text):
    """Drop comments, string literals and `#[cfg(test)] mod ... { }` blocks."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def expand_use(body):
    """`a::{b, c::{d, e}}` -> ["a::b", "a::c::d", "a::c::e"]."""
    body = re.sub(r"\s+", "", body)
    m = re.search(r"\{", body)
    if not m:
        return [re.sub(r"\bas\b.*$", "", body)]
    prefix, inner = body[: m.start()], body[m.end() : -1]
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        cur += ch
    parts.append(cur)
    paths = []
    for p in filter(None, parts):
        for sub in expand_use(p):
            paths.append(prefix + sub if sub != "self" else prefix.rstrip(":"))
    return paths


def crate_paths(text):
    """Every `crate::...` path named in the code (use items expanded)."""
    paths = []
    for m in re.finditer(r"\buse\s+crate::([^;]*);", text):
        paths += expand_use(m.group(1))
    text = re.sub(r"\buse\s+crate::[^;]*;", "", text)
    for m in re.finditer(r"\bcrate::((?:\w+::)*\w+)", text):
        paths.append(m.group(1))
    return paths


def resolve(segments, files):
    """The file a `crate::a::b::c` path lands in: the deepest existing module file."""
    best = None
    for k in range(1, len(segments) + 1):
        base = os.path.join(*segments[:k])
        for cand in (base + ".rs", os.path.join(base, "mod.rs")):
            if cand in files:
                best = cand
    return best


def top(path):
    return path.split(os.sep)[0].removesuffix(".rs")


def main():
    quiet = "--quiet" in sys.argv
    files = set(rust_files())
    arrows = {}  # (from, to) -> sorted names
    for f in sorted(files):
        with open(os.path.join(ROOT, f), encoding="utf-8") as fh:
            text = strip_noise(fh.read())
        for p in crate_paths(text):
            segs = [s for s in p.split("::") if s and s != "self"]
            target = resolve(segs, files)
            if target is None or target == f:
                continue
            arrows.setdefault((f, target), set()).add(segs[-1])

    problems = []
    upward = 0
    for (a, b), names in sorted(arrows.items()):
        ta, tb = top(a), top(b)
        mark = ""
        if ta != tb:
            la, lb = LAYER_OF.get(ta), LAYER_OF.get(tb)
            if la is None or lb is None:
                unknown = ta if la is None else tb
                problems.append(f"module {unknown!r} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md")
                mark = "  <- UNKNOWN MODULE"
            elif lb > la:
                upward += 1
                mark = f"  <- UPWARD ({LAYERS[la][0]} -> {LAYERS[lb][0]})"
                problems.append(f"upward arrow {a} -> {b} ({', '.join(sorted(names))})")
        if not quiet or mark:
            print(f"{a} -> {b}: {', '.join(sorted(names))}{mark}")

    # Cycles among files: strongly connected components with more than one file.
    graph = {}
    for a, b in arrows:
        graph.setdefault(a, set()).add(b)
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    for c in sccs:
        problems.append(f"import cycle among {len(c)} files: {', '.join(c)}")

    for p in dict.fromkeys(problems):
        print(f"layers: ERROR: {p}")
    print(f"layers: {len(arrows)} arrows, {upward} upward, {len(sccs)} cycles")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
