"""The import graph of medcg/, configs/ and experiments/ has no cycle (DEVELOPING.md: Architecture).

Every `import` / `from ... import` of a medcg module counts, at the top level or inside a function: a lazy import
hides a cycle from Python, not from the layering. A name imported from a package counts as its submodule when
that file exists (`from medcg.eval import report` is `medcg.eval.report`), else as the package's `__init__`.
Importing a submodule also runs its parents' `__init__`s; those edges are left out, so a package may re-export
its own submodules (the submodules must then import each other, never the package).
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("medcg", "configs", "experiments")  # medcg.demo and medcg.preflight import configs


def module_files(root: str = ROOT) -> dict[str, str]:
  """Module name -> file, for every .py under the packages (`pkg/__init__.py` is `pkg`)."""
  out = {}
  for package in PACKAGES:
    out.update(_package_files(root, package))
  return out


def _package_files(root: str, package: str) -> dict[str, str]:
  out = {}
  for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
    for name in sorted(filenames):
      if not name.endswith(".py"):
        continue
      parts = os.path.relpath(os.path.join(dirpath, name), root)[:-3].split(os.sep)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = os.path.join(dirpath, name)
  return out


def _existing(name: str, modules) -> str | None:
  """`name`, or its longest prefix that is a module (`medcg.x.attr` -> `medcg.x`); None outside medcg."""
  parts = name.split(".")
  while parts:
    if ".".join(parts) in modules:
      return ".".join(parts)
    parts.pop()
  return None


def imports_of(module: str, path: str, modules) -> set[str]:
  """The medcg modules `module` imports anywhere in its file."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  is_package = os.path.basename(path) == "__init__.py"
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        out.add(_existing(alias.name, modules))
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module
      for alias in node.names:
        sub = f"{source}.{alias.name}"
        out.add(sub if sub in modules else _existing(source, modules))
  out.discard(None)
  out.discard(module)
  return out


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
  modules = module_files(root)
  return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
  state = {}  # 1: on the current path, 2: done
  for start in sorted(graph):
    if start in state:
      continue
    path, stack = [start], [iter(sorted(graph[start]))]
    state[start] = 1
    while stack:
      nxt = next(stack[-1], None)
      if nxt is None:
        state[path.pop()] = 2
        stack.pop()
      elif state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      elif nxt not in state:
        state[nxt] = 1
        path.append(nxt)
        stack.append(iter(sorted(graph.get(nxt, ()))))
  return None


def test_graph_is_read():
  graph = import_graph()
  assert "medcg.train.trainer" in graph and "medcg.eval.runner" in graph
  assert "medcg.eval.metrics" in graph["medcg.eval.runner"]  # `from medcg.eval import metrics` is the submodule
  assert "configs.hardware" in graph["configs.common"] and "configs.cg_table3" in graph["configs.fit"]


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_eval_does_not_import_the_trainer():
  """One way: the trainer calls medcg.eval.runner for its default hook; evaluation reaches train's lower
  modules (sharding, run_info) only. The command lines (`__main__`) sit above both."""
  graph = import_graph()
  for m in graph:
    if m.startswith("medcg.eval.") and m != "medcg.eval.__main__":
      assert "medcg.train.trainer" not in graph[m], f"{m} imports medcg.train.trainer"
