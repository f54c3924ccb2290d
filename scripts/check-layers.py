#!/usr/bin/env python3
"""Checks that src/ is layered: no import circle among its files or folders,
and no import running upward between the layers README "Architecture" names;
and that its tree names every file of the folders it itemises.

    scripts/check-layers.py        exit 1 and name the offending imports

An import is any path through `crate::`, `super::` or `self::` in a `use` or in
code (`crate::engine::redrive::Engine::new`). `mod x;` declarations are not
imports; a parent's `pub use x::...` of its own child is. Test modules
(`#[cfg(test)] mod tests`) are skipped: they may reach anywhere.
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
# Top to bottom: a module may use only the ones below it. A folder is one layer.
LAYERS = ["main", "cli", "sidecar", "output", "engine", "backend", "config", "filter", "model"]
EXEMPT = {"lib", "fuzzing"}  # the crate root declares; fuzz entry points may call anything


def module_of(path: Path) -> tuple:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts.pop()
    return tuple(parts)


def strip_tests(text: str) -> str:
    # Drop `#[cfg(test)] mod tests { ... }` by brace matching.
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while depth and j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def strip_comments(text: str) -> str:
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    text = re.sub(r"'(?:\\.|[^'\\])'", "' '", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def paths_in(text: str):
    """Every crate/super/self path, with `use a::{b, c::d}` groups expanded."""
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        yield from expand(m.group(1).replace("\n", " "))
    body = re.sub(r"\buse\s+[^;]+;", "", text)
    for m in re.finditer(r"\b((?:crate|super|self)(?:::\w+)+)", body):
        yield m.group(1)


def expand(tree: str):
    tree = re.sub(r"\s+", "", tree)
    brace = tree.find("{")
    if brace < 0:
        yield tree.split(" as ")[0]
        return
    prefix, inner = tree[:brace], tree[brace + 1 : tree.rfind("}")]
    depth, start = 0, 0
    for i, c in enumerate(inner + ","):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            item = inner[start:i]
            start = i + 1
            if item:
                yield from expand(prefix + item if item != "self" else prefix.rstrip(":"))


def resolve(path: str, mod: tuple, modules: set):
    """The module a `crate::`, `super::` or `self::` path lands in, or None for
    anything else (std, other crates)."""
    parts = path.split("::")
    if parts[0] == "crate":
        base, parts = [], parts[1:]
    elif parts[0] in ("super", "self"):
        # `mod` is this file's module (a/b.rs and a/b/mod.rs are both a::b).
        base = list(mod)
        if parts[0] == "self":
            parts = parts[1:]
        while parts and parts[0] == "super":
            base, parts = base[:-1], parts[1:]
    else:
        return None
    full = base + parts
    for n in range(len(full), -1, -1):
        if tuple(full[:n]) in modules:
            return tuple(full[:n])
    return None


def main() -> int:
    files = {module_of(p): p for p in SRC.rglob("*.rs")}
    modules = set(files)
    edges = {}
    for mod, path in files.items():
        if mod and mod[0] in EXEMPT:
            continue
        text = strip_tests(strip_comments(path.read_text()))
        targets = set()
        for p in paths_in(text):
            t = resolve(p, mod, modules)
            if t is not None and t != mod and t != ():
                targets.add(t)
        if path.name == "main.rs":
            targets |= {(m.group(1),) for m in re.finditer(r"dlq_bridge::(\w+)", text) if (m.group(1),) in modules}
        edges[mod] = targets

    errors = []
    # Upward imports between layers.
    rank = {name: i for i, name in enumerate(LAYERS)}
    for src, targets in edges.items():
        if not src or src[0] in EXEMPT:
            continue
        for t in targets:
            a, b = rank.get(src[0]), rank.get(t[0])
            if a is not None and b is not None and b < a:
                errors.append(f"upward import: {'/'.join(src)} uses {'/'.join(t)} ({t[0]} is above {src[0]})")
    # Circles among files (Tarjan's strongly connected components).
    for scc in sccs(edges):
        if len(scc) > 1:
            errors.append("import circle among files: " + ", ".join("/".join(m) or "lib" for m in sorted(scc)))
    # Circles among folders: collapse each module to its parent folder.
    folder_edges = {}
    for src, targets in edges.items():
        for t in targets:
            fa, fb = src[:-1] if len(src) > 1 else src, t[:-1] if len(t) > 1 else t
            if fa != fb and not (fb[: len(fa)] == fa or fa[: len(fb)] == fb):
                folder_edges.setdefault(fa, set()).add(fb)
    for scc in sccs(folder_edges):
        if len(scc) > 1:
            errors.append("import circle among folders: " + ", ".join("/".join(m) for m in sorted(scc)))
    errors += untold_files()
    for e in errors:
        print(f"check-layers: {e}", file=sys.stderr)
    if not errors:
        print(f"check-layers: {len(edges)} modules, layered {' > '.join(LAYERS)}, no circle")
    return 1 if errors else 0


def untold_files():
    """README "Architecture" draws src/ as a tree. A folder it itemises (names
    any file of) must name each of its files; a folder it only summarises
    (`dashboard/`, `triage/`) need not. mod.rs and lib.rs go without saying."""
    readme = (SRC.parent / "README.md").read_text()
    start = readme.index("## Architecture")
    tree = readme[readme.index("```", start) : readme.index("```", readme.index("```", start) + 3)]
    named = set(re.findall(r"\b([a-z_]+\.rs)\b", tree))
    by_folder = {}
    for path in SRC.rglob("*.rs"):
        rel = path.relative_to(SRC)
        if rel.name in ("mod.rs", "lib.rs"):
            continue
        by_folder.setdefault(rel.parent, []).append(rel)
    errors = []
    for folder, rels in sorted(by_folder.items()):
        if not any(r.name in named for r in rels):
            continue
        for r in sorted(rels):
            if r.name not in named:
                errors.append(f"README Architecture does not name src/{r}")
    return errors


def sccs(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    nodes = set(graph) | {t for ts in graph.values() for t in ts}

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    sys.exit(main())
