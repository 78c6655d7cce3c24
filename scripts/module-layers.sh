#!/usr/bin/env bash
# Prints which of the server's top-level modules use which (from
# `crate::<module>` paths in non-test code), and fails if two import each
# other directly or through others: the layers must form a line.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 - <<'PY'
import os, re, sys
src = "src"
mods = sorted(
    n[:-3] if n.endswith(".rs") else n
    for n in os.listdir(src)
    if n not in ("lib.rs", "main.rs", "bin") and (n.endswith(".rs") or os.path.isdir(os.path.join(src, n)))
)
def files(m):
    p = os.path.join(src, m)
    if os.path.isdir(p):
        for root, _, names in os.walk(p):
            for n in names:
                if n.endswith(".rs") and n != "tests.rs":
                    yield os.path.join(root, n)
    else:
        yield p + ".rs"
edges = {m: set() for m in mods}
for m in mods:
    for f in files(m):
        text = open(f).read()
        # Only what precedes the file's tests counts.
        text = text.split("#[cfg(test)]")[0]
        text = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))
        for other in re.findall(r"crate::([a-z_]+)", text):
            if other != m and other in edges:
                edges[m].add(other)
for m in mods:
    if edges[m]:
        print(f"{m} -> {', '.join(sorted(edges[m]))}")
# Find cycles (depth-first).
state, stack, cycles = {}, [], []
def visit(m):
    state[m] = 1
    stack.append(m)
    for o in sorted(edges[m]):
        if state.get(o) == 1:
            cycles.append(stack[stack.index(o):] + [o])
        elif o not in state:
            visit(o)
    stack.pop()
    state[m] = 2
for m in mods:
    if m not in state:
        visit(m)
if cycles:
    for c in cycles:
        print("cycle: " + " -> ".join(c), file=sys.stderr)
    sys.exit(1)
print("no cycles")
PY
