"""The library's import graph: cnn_jax never imports its tooling (benchmarks, reproduce),
and has no cycles.

Every import statement counts, those inside function bodies included: a lazy import is a
dependency all the same, and a cycle hidden in a function is still a cycle. An import
names the cnn_jax module it loads (`from cnn_jax import sweep` -> cnn_jax.sweep,
`from cnn_jax.models import MODELS` -> cnn_jax.models); the parent packages Python loads
on the way are not counted as edges.
"""

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {_module_name(p): p for p in sorted((ROOT / 'cnn_jax').rglob('*.py'))}


def _imports(path: pathlib.Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) of every import statement anywhere in `path`.

    `import a.b` gives ('a.b', None); `from a import b, c` gives ('a', 'b'), ('a', 'c').
    """
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f'{path}: relative import'  # The code base has none.
            out += [(node.module, alias.name) for alias in node.names]
    return out


def _resolve(name: str) -> str | None:
    """The longest prefix of dotted `name` that is a cnn_jax module."""
    parts = name.split('.')
    for n in range(len(parts), 0, -1):
        if '.'.join(parts[:n]) in MODULES:
            return '.'.join(parts[:n])
    return None


def import_graph() -> dict[str, set[str]]:
    """cnn_jax module -> the cnn_jax modules it imports."""
    graph = {}
    for name, path in MODULES.items():
        targets = set()
        for module, item in _imports(path):
            submodule = f'{module}.{item}'
            target = submodule if submodule in MODULES else _resolve(module)
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}  # 'open' while on the stack, then 'done'.
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 'done'
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_scan_sees_imports_inside_functions():
    graph = import_graph()
    # cli.run imports the study and task modules in its body, after flag parsing.
    assert {'cnn_jax.study', 'cnn_jax.tasks'} <= graph['cnn_jax.cli']
    # `from cnn_jax.models import layers` names the submodule, not the package.
    assert 'cnn_jax.models.layers' in graph['cnn_jax.summary']
    assert 'cnn_jax.models' not in graph['cnn_jax.summary']


def test_find_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'a'}}) == ['a', 'a']


def test_cnn_jax_never_imports_benchmarks_or_the_reproduction_runner():
    offenders = [
        f'{name} imports {module}'
        for name, path in MODULES.items()
        for module, _ in _imports(path)
        if module.split('.')[0] in ('benchmarks', 'reproduce')
    ]
    assert not offenders


def test_cnn_jax_import_graph_has_no_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


@pytest.mark.parametrize('name', sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)
