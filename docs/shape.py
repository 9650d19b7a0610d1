#!/usr/bin/env python3
"""The shape of the library, as a newcomer would count it: files over 700 lines and functions over
100 (unit tests left out), and import cycles between the top-level modules of `daemon/` (module A
depends on B when A names `crate::B`). Usage: python3 docs/shape.py [daemon]"""
import os, re, sys
root = sys.argv[1] if len(sys.argv) > 1 else "daemon"
files = []
for d, _, fs in os.walk(root):
    for f in fs:
        if f.endswith(".rs") and f != "tests.rs":  # unit tests in a file of their own
            files.append(os.path.join(d, f))
long_files, long_fns = [], []
for path in sorted(files):
    text = open(path).read()
    # drop the unit tests: `#[cfg(test)] mod tests { ... }` at the end
    cut = re.search(r"\n#\[cfg\(test\)\]\s*\nmod tests", text)
    body = text[:cut.start()] if cut else text
    n = body.count("\n")
    if n > 700:
        long_files.append((n, path))
    lines = body.split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"\s*(pub(\([^)]*\))?\s+)?(async\s+)?(const\s+)?(unsafe\s+)?fn\s+(\w+)", lines[i])
        if m:
            depth, started, j = 0, False, i
            while j < len(lines):
                s = re.sub(r'"(\\.|[^"\\])*"', '""', lines[j])
                s = re.sub(r"//.*", "", s)
                depth += s.count("{") - s.count("}")
                if s.count("{"): started = True
                if started and depth <= 0: break
                if not started and s.rstrip().endswith(";"): break
                j += 1
            length = j - i + 1
            if length > 100:
                long_fns.append((length, path, m.group(6)))
            i = j + 1
        else:
            i += 1
print("files over 700 lines (tests excluded):", len(long_files))
for n, p in sorted(long_files, reverse=True): print(f"  {n:5} {p}")
print("functions over 100 lines:", len(long_fns))
for n, p, f in sorted(long_fns, reverse=True): print(f"  {n:5} {p}::{f}")

# Import cycles between the library's top-level modules: module A depends on B when A's files
# name `crate::B`. Strongly connected components of more than one module are cycles.
lib = os.path.join(root, "lib.rs")
top = {}
for path in files:
    rel = os.path.relpath(path, root)
    if rel in ("lib.rs", "main.rs") or rel.startswith("cli" + os.sep) or rel.startswith("bin" + os.sep):
        continue
    mod = rel.split(os.sep)[0].removesuffix(".rs")
    if mod == "mod": continue
    top.setdefault(mod, []).append(path)
edges = {m: set() for m in top}
for m, paths in top.items():
    for p in paths:
        text = open(p).read()
        cut = re.search(r"\n#\[cfg\(test\)\]\s*\nmod tests", text)
        text = text[:cut.start()] if cut else text
        names = set(re.findall(r"crate::(\w+)", text))
        for block in re.findall(r"crate::\{([^}]*)\}", text):
            names |= set(re.findall(r"(?:^|,)\s*(\w+)", block))
        for n in names:
            if n in top and n != m: edges[m].add(n)
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def strong(v):
    index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index: strong(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(sorted(comp))
for v in sorted(edges):
    if v not in index: strong(v)
print("import cycles between top-level modules:", len(sccs))
for c in sccs: print("  ", " ↔ ".join(c))

# Modules outside cache/ (and the binary) whose code, comments and strings left out, names the
# Redis backend: an identifier containing `redis` in any case.
def code_only(text):
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    return re.sub(r"//.*", "", text)
naming = {}
for m, paths in top.items():
    if m == "cache": continue
    for p in paths:
        text = open(p).read()
        cut = re.search(r"\n#\[cfg\(test\)\]\s*\nmod tests", text)
        text = code_only(text[:cut.start()] if cut else text)
        found = sorted(set(re.findall(r"\b\w*[Rr]edis\w*\b", text)))
        if found: naming.setdefault(m, set()).update(found)
print("modules outside cache/ naming the Redis backend:", len(naming))
for m in sorted(naming): print(f"  {m}: {', '.join(sorted(naming[m]))}")
