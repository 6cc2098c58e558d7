"""The README's import rule: data.py, reward.py, dist.py, fastgen.py and losses.py import no kit module; eval.py
never reaches raft.py; no file imports back into one that imports it (no circle), counting imports inside functions
too."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIT = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def kit_imports(name: str) -> set:
    """The kit modules a file imports anywhere in it (module level, functions, try blocks)."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py"), encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(KIT) - {name}


def reach(graph: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_imports_run_one_way():
    graph = {m: kit_imports(m) for m in KIT}
    assert {"raft", "data", "reward", "sampling", "fastgen"} <= set(KIT)
    assert graph["raft"] >= {"data", "dist", "metrics", "models", "reward", "sampling"}  # the walk sees imports
    for leaf in ("data", "reward", "dist", "fastgen", "losses"):
        assert graph[leaf] == set(), f"{leaf}.py imports {graph[leaf]}"
    assert "raft" not in reach(graph, "eval")
    circles = [m for m in KIT if m in reach(graph, m)]
    assert not circles, f"these files import themselves through others: {circles}"
