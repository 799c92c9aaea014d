"""The package's layers hold: no import from a lower layer to a higher one or across a layer's parts,
no cycle (within a subpackage too), no private name imported from another module.

The layers, lowest first, as rlhf_jax/__init__.py describes them. A layer may hold several parts
(config and core; tasks and the command lines) that must not import each other.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYERS = (("options",), ("config", "core"), ("models",), ("parallel",), ("sampling",), ("step",), ("run",),
          ("plan",), ("tasks", "train", "train_reward"))


def import_graph(package_dir: str, package: str = "rlhf_jax") -> dict[str, dict[str, set[str]]]:
    """{module: {imported module: names imported from it}} for every module under `package_dir`. An
    import of a submodule (`from rlhf_jax.core import kl`) is an edge to that submodule, the package's
    own `__init__` only where the name is defined there; `import a.b` is an edge to a.b."""
    root = os.path.dirname(package_dir)
    modules = {}
    for folder, _, files in os.walk(package_dir):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                modules[os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")] = path
    graph = {}
    for module, path in modules.items():
        edges: dict[str, set[str]] = {}
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    target = sub if sub in modules else node.module
                    edges.setdefault(target, set()).add("" if target == sub else alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == package:
                        edges.setdefault(alias.name, set())
        graph[module] = edges
    return graph


def part_of(module: str) -> str:
    """The layer part of a module: its top-level name under the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(graph, part=part_of, layers=LAYERS) -> list[str]:
    """Imports that point up, or across two parts of one layer; modules in no layer."""
    level = {name: i for i, names in enumerate(layers) for name in names}
    problems = []
    for module, edges in sorted(graph.items()):
        here = part(module)
        if here == "":
            continue  # the package's own __init__: the public names, imported lazily by name
        if here not in level:
            problems.append(f"{module} is in no layer")
            continue
        for target in sorted(edges):
            there = part(target)
            if there == here:
                continue
            if there not in level or level[there] > level[here]:
                problems.append(f"{module} -> {target} (up: {here} is below {there})")
            elif level[there] == level[here]:
                problems.append(f"{module} -> {target} (across: {here} and {there} are parts of one layer)")
    return problems


def cycles(graph) -> list[list[str]]:
    """Every import cycle between modules, as the modules around it (a subpackage's __init__ importing
    its own submodules is one only where a submodule imports the __init__ back)."""
    found, state, stack = [], {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in graph.get(module, ()):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def private_imports(graph) -> list[str]:
    """Names with a leading underscore imported from another module."""
    return [f"{module} imports {name} from {target}" for module, edges in sorted(graph.items())
            for target, names in sorted(edges.items()) for name in sorted(names)
            if name.startswith("_") and not name.startswith("__") and target != module]


def test_imports_point_down_the_layers():
    graph = import_graph(os.path.join(ROOT, "rlhf_jax"))
    assert len(graph) > 40  # every module was read
    assert not layer_violations(graph), "\n".join(layer_violations(graph))
    assert not cycles(graph), cycles(graph)
    assert not private_imports(graph), private_imports(graph)


def test_the_checks_catch_each_kind_of_wrong_import():
    graph = {"rlhf_jax.core.kl": {"rlhf_jax.options": set()},
             "rlhf_jax.core.advantages": {"rlhf_jax.models.heads": {"last_token_index"}},  # up
             "rlhf_jax.config": {"rlhf_jax.core.losses": {"SAMPLER_CORRECTIONS"}},  # across
             "rlhf_jax.models.heads": {"rlhf_jax.models": {"CausalLM"}},
             "rlhf_jax.models": {"rlhf_jax.models.heads": set()},  # a cycle through the __init__
             "rlhf_jax.step.update": {"rlhf_jax.step.forward": {"_Forward"}},  # private
             "rlhf_jax.tasks.demo": {"rlhf_jax.train": {"train"}},  # across: tasks and the command lines
             "rlhf_jax.newthing": {}}
    assert layer_violations(graph) == [
        "rlhf_jax.config -> rlhf_jax.core.losses (across: config and core are parts of one layer)",
        "rlhf_jax.core.advantages -> rlhf_jax.models.heads (up: core is below models)",
        "rlhf_jax.newthing is in no layer",
        "rlhf_jax.tasks.demo -> rlhf_jax.train (across: tasks and train are parts of one layer)"]
    assert cycles(graph) == [["rlhf_jax.models.heads", "rlhf_jax.models", "rlhf_jax.models.heads"]]
    assert private_imports(graph) == ["rlhf_jax.step.update imports _Forward from rlhf_jax.step.forward"]
