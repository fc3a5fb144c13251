"""Import contracts over the whole tree: layers import downwards only, and nothing cycles.

The test of equal force to import-linter that issue 15 asks for, read from the
source (ast), so it needs nothing installed and runs in a second. A module's
layer is its folder under src/rainbowd (``src/rainbowd/core/sched/pieces.py``
is in core):

* **core** (pure: wire schemas, chunk bookkeeping, the scheduler) imports no
  other layer of rbd, and of the rest only the pure standard modules of
  :data:`CORE_STDLIB` (no I/O, no clock: time is passed in) and the pure
  codecs of :data:`CORE_LIBRARIES`;
* **lib** (I/O shared by processes: store, images, the HTTP client) imports
  only core;
* **agent** and **coordinator** import core and lib, never each other; inside
  the coordinator only its HTTP package and its ``cli`` import
  ``rainbowd.coordinator.http`` (the services know nothing of HTTP);
* **cli** and **devcluster** (local cluster, demo, namespace lab) sit on top;
  bench/ and tests/ may import anything, and nothing of rbd imports them;
* no import cycle anywhere, ``if TYPE_CHECKING:`` imports included (a cycle
  for the type checker is one for the reader too).

Every module is in a layer's folder: a module put beside them (in
src/rainbowd itself) or a folder that is no layer fails, so the layering is a
decision, not an accident. Each check is a function of a source tree, and
:func:`test_the_checks_see_a_violation` plants one violation of each kind in
a made-up tree, so a pass means something.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
#: the package's folder: one sub-folder per layer
PACKAGE = TOP / "src" / "rainbowd"
#: what each layer (a folder of src/rainbowd) may import besides itself
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "lib": {"core"},
    "agent": {"core", "lib"},
    "coordinator": {"core", "lib"},
    "cli": {"core", "lib", "devcluster"},  # `rbd demo` runs the local cluster
    "devcluster": {"core", "lib", "agent", "coordinator"},
}
#: packages inside a layer that only some modules may import: package -> who may
INNER_FENCES: dict[str, set[str]] = {
    # the coordinator's services are plain Python on a narrow context; HTTP wraps them
    "rainbowd.coordinator.http": {"rainbowd.coordinator.http", "rainbowd.coordinator.cli"},
}
#: what core may import that is not the standard library: wire codecs, pure and in-memory
CORE_LIBRARIES = {"msgpack", "msgspec"}
#: the standard modules core may import: pure computation, no I/O and no clock. An
#: allow-list, not a deny-list, so a module that does I/O (logging, select, glob, gzip,
#: random's global state, a database driver such as psycopg ...) cannot slip into core
#: because nobody named it. ``sys`` for ``sys.float_info`` (wirebounds); ``secrets`` is the
#: entropy of report ids (report_id), not I/O. Add a module here only if it is as pure.
CORE_STDLIB = {
    "__future__",
    "abc",
    "base64",
    "binascii",
    "bisect",
    "collections",
    "contextlib",
    "copy",
    "dataclasses",
    "enum",
    "fractions",
    "functools",
    "hashlib",
    "heapq",
    "hmac",
    "ipaddress",
    "itertools",
    "json",
    "math",
    "numbers",
    "operator",
    "re",
    "secrets",
    "statistics",
    "string",
    "struct",
    "sys",
    "textwrap",
    "types",
    "typing",
    "zlib",
}
#: cycles known today, each with what removes it; a cycle not listed fails, and so does a
#: listed one that is gone (the list only shrinks). Empty: the last one, the planner's
#: modules with the scheduler, went when the policies came to see the scheduler only
#: through rainbowd.core.sched.view.SchedulerView (issue 15, item 5)
KNOWN_CYCLES: set[frozenset[str]] = set()


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module under ``package`` by dotted name (``rainbowd.core.sched.pieces``)."""
    out: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = [package.name, *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(name: str, path: Path) -> Iterator[str]:
    """Every module name ``path`` imports (absolute; relative ones resolved), anywhere in it."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{a.name}" for a in node.names)  # from pkg import module


def _graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = _modules(package)
    return {
        name: {m for m in _imported(name, path) if m in modules and m != name}
        for name, path in modules.items()
    }


def _layer(module: str) -> str:
    """A module's layer: its folder under the package ("" for a module beside the layers).

    The package's own ``__init__`` (``rainbowd``: its version and docstring) is core.
    """
    parts = module.split(".")
    if len(parts) == 1:
        return "core"
    return parts[1] if len(parts) > 2 or parts[1] in MAY_IMPORT else ""


def unplaced(package: Path = PACKAGE) -> list[str]:
    """Modules beside the layers, or in a folder that is no layer."""
    return sorted(m for m in _modules(package) if _layer(m) not in MAY_IMPORT)


def upward_imports(package: Path = PACKAGE) -> list[str]:
    """Imports of a layer its importer may not import, and imports across an inner fence."""
    wrong = [
        f"{name} ({_layer(name)}) imports {dep} ({_layer(dep)})"
        for name, deps in sorted(_graph(package).items())
        for dep in sorted(deps)
        if _layer(dep) != _layer(name) and _layer(dep) not in MAY_IMPORT.get(_layer(name), set())
    ]
    for name, deps in sorted(_graph(package).items()):
        for fence, allowed in INNER_FENCES.items():
            if any(_within(name, a) for a in allowed):
                continue
            wrong += [
                f"{name} imports {dep} (only {sorted(allowed)} may)"
                for dep in sorted(deps)
                if _within(dep, fence)
            ]
    return wrong


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def core_io(package: Path = PACKAGE) -> list[str]:
    """Imports of core that are neither core nor pure: I/O, the clock, any other library."""
    pure = CORE_STDLIB | CORE_LIBRARIES
    return [
        f"{name} imports {m}"
        for name, path in sorted(_modules(package).items())
        if _layer(name) == "core"
        for m in sorted(set(_imported(name, path)))
        if m.split(".")[0] != package.name and m.split(".")[0] not in pure
    ]


def imports_of_bench_or_tests(package: Path = PACKAGE) -> list[str]:
    return [
        f"{name} imports {m}"
        for name, path in sorted(_modules(package).items())
        for m in sorted(set(_imported(name, path)))
        if m.split(".")[0] in {"bench", "tests"}
    ]


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_every_module_is_in_a_layers_folder() -> None:
    assert not unplaced(), (
        "put these in a layer's folder of src/rainbowd (core, lib, agent, coordinator, cli,"
        f" devcluster; tests/contracts/test_import_contracts.py): {unplaced()}"
    )
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(
        MAY_IMPORT
    )


def test_layers_import_only_downwards() -> None:
    wrong = upward_imports()
    assert not wrong, "\n".join(wrong)


def test_core_does_no_io_and_reads_no_clock() -> None:
    wrong = core_io()
    assert not wrong, "\n".join(wrong)
    assert CORE_STDLIB <= set(sys.stdlib_module_names), CORE_STDLIB - set(sys.stdlib_module_names)


def test_nothing_of_rbd_imports_bench_or_tests() -> None:
    wrong = imports_of_bench_or_tests()
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_but_the_known_ones() -> None:
    cycles = set(_cycles(_graph()))
    assert cycles - KNOWN_CYCLES == set(), [sorted(c) for c in cycles - KNOWN_CYCLES]
    assert KNOWN_CYCLES - cycles == set(), (
        "a known cycle is gone: drop it from KNOWN_CYCLES",
        [sorted(c) for c in KNOWN_CYCLES - cycles],
    )


def _plant(root: Path, files: dict[str, str]) -> Path:
    package = root / "rainbowd"
    for rel, text in {"__init__.py": "", **files}.items():
        path = package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for folder in path.relative_to(package).parents:
            (package / folder / "__init__.py").touch()
        path.write_text(text)
    return package


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """One violation of each kind, planted in a made-up tree, is each found; a clean one is not."""
    clean = _plant(
        tmp_path / "clean",
        {
            "core/a.py": "import json\nimport msgspec\n",
            "core/sched/b.py": "from ..a import x\n",
            "lib/c.py": "import os\nfrom rainbowd.core.sched import b\n",
            "agent/dataplane/d.py": "from rainbowd.lib.c import y\n",
            "coordinator/http/app.py": "from .. import state\n",
            "coordinator/state.py": "import sqlite3\n",
            "coordinator/cli.py": "from .http import app\n",
            "devcluster/e.py": "from rainbowd.agent.dataplane import d\nimport rainbowd.lib\n",
            "cli/main.py": "from rainbowd.devcluster import e\n",
        },
    )
    assert (unplaced(clean), upward_imports(clean), core_io(clean)) == ([], [], [])
    assert _cycles(_graph(clean)) == []
    bad = _plant(
        tmp_path / "bad",
        {
            "stray.py": "",  # beside the layers
            "misc/x.py": "",  # a folder that is no layer
            "core/a.py": "import time, aiohttp, logging\nfrom rainbowd.lib.c import q\n",
            "lib/c.py": "from rainbowd.agent.d import z\n",
            "agent/d.py": "from rainbowd.coordinator.state import s\n",
            "coordinator/state.py": "from rainbowd.coordinator.http.app import routes\n",
            "coordinator/http/app.py": "from rainbowd.core.a import x\nimport tests.support\n",
        },
    )
    assert unplaced(bad) == ["rainbowd.misc", "rainbowd.misc.x", "rainbowd.stray"]
    assert upward_imports(bad) == [
        "rainbowd.agent.d (agent) imports rainbowd.coordinator.state (coordinator)",
        "rainbowd.core.a (core) imports rainbowd.lib.c (lib)",
        "rainbowd.lib.c (lib) imports rainbowd.agent.d (agent)",
        "rainbowd.coordinator.state imports rainbowd.coordinator.http.app"
        " (only ['rainbowd.coordinator.cli', 'rainbowd.coordinator.http'] may)",
    ]
    assert core_io(bad) == [
        "rainbowd.core.a imports aiohttp",
        "rainbowd.core.a imports logging",  # I/O a deny-list of I/O modules had not named
        "rainbowd.core.a imports time",
    ]
    assert imports_of_bench_or_tests(bad) == ["rainbowd.coordinator.http.app imports tests.support"]
    assert _cycles(_graph(bad)) == [
        frozenset(
            {
                f"rainbowd.{m}"
                for m in ("core.a", "lib.c", "agent.d", "coordinator.state", "coordinator.http.app")
            }
        )
    ]
    # and the real graph is read: the puller's fetch loop uses the store (lib) and the chunk
    # protocol (core)
    assert {"rainbowd.lib.store", "rainbowd.core.chunkproto"} <= _graph()[
        "rainbowd.agent.dataplane.chunk_fetch"
    ]
