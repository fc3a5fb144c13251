"""Import contracts over the whole tree: layers import downwards only, and nothing cycles.

The test of equal force to import-linter that issue 15 asks for, read from the
source (ast), so it needs nothing installed and runs in a second:

* **core** (pure: wire schemas, chunk bookkeeping, the scheduler) imports no
  other layer of rbd and no I/O library, not even the clock: time is passed in;
* **lib** (I/O shared by processes: store, images, the HTTP client) imports
  only core and lib;
* **agent** and **coordinator** import core and lib, never each other;
* **cli** and **devcluster** (local cluster, demo, namespace lab) sit on top;
  bench/ and tests/ may import anything, and nothing of rbd imports them;
* no import cycle anywhere, ``if TYPE_CHECKING:`` imports included (a cycle
  for the type checker is one for the reader too).

Every module of rbd is in exactly one layer of :data:`LAYERS`: a new module
fails this test until it is placed, so the layering is a decision, not an
accident. The layers are modules of a flat package today; issue 15's folder
per layer moves them without changing this table's meaning.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
#: where each package's modules live (pyproject.toml's package-dir mapping)
PACKAGES = {
    "rainbowd": TOP / "src" / "rainbowd",
    "rainbowd.agent": TOP / "agent",
    "rainbowd.coordinator": TOP / "coordinator",
}
#: the flat package's modules by layer (agent/ and coordinator/ are a layer each, whole)
LAYERS: dict[str, set[str]] = {
    "core": {
        "rainbowd",
        "chunkproto",
        "chunks",
        "chunksession",  # the fetch and serve sessions: the chunk channel's state, sans I/O
        "digest",
        "eviction",
        "jobdriver",  # jobs, reports and faults as scheduler calls (coordinator and simulator)
        "messages",
        "pieces",
        "policies",
        "report_id",
        "scheduler",
        "sources",
        "units",
        "waiting",
        "wirebounds",
    },
    "lib": {
        "buildcontext",
        "client",
        "compression",
        "dockerfile",
        "hostplatform",
        "image",
        "log",
        "ocilayout",
        "progress",  # the live job display: `rbd distribute` and `rbd demo` both show it
        "store",
    },
    "cli": {"cli", "opscli"},
    "devcluster": {
        "demo",
        "dockerd",
        "imagebuild",
        "localcluster",
        "netlab",
        "profile",
        "registryconf",
    },
}
#: what each layer may import (besides itself)
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "lib": {"core"},
    "agent": {"core", "lib"},
    "coordinator": {"core", "lib"},
    "cli": {"core", "lib", "devcluster"},  # `rbd demo` runs the local cluster
    "devcluster": {"core", "lib", "agent", "coordinator"},
}
#: libraries that do I/O or read the clock: core imports none of them
IO_LIBRARIES = {
    "aiodocker",
    "aiohttp",
    "asyncio",
    "asyncpg",
    "asyncssh",
    "datetime",
    "http",
    "io",
    "os",
    "pathlib",
    "psycopg",
    "shutil",
    "socket",
    "sqlite3",
    "ssl",
    "subprocess",
    "tarfile",
    "tempfile",
    "threading",
    "time",
    "urllib",
}
#: cycles known today, each with what removes it; a cycle not listed fails, and so does a
#: listed one that is gone (the list only shrinks)
KNOWN_CYCLES = {
    # policies read the scheduler's private state and call its _start (issue 15, item 5:
    # policies one per file behind a small protocol)
    frozenset({"rainbowd.policies", "rainbowd.scheduler"}),
}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
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


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {m for m in _imported(name, path) if m in modules and m != name}
        for name, path in modules.items()
    }


def _layer(module: str) -> str:
    for package in ("rainbowd.agent", "rainbowd.coordinator"):
        if module == package or module.startswith(package + "."):
            return package.rpartition(".")[2]
    short = _short_name(module)
    return next((layer for layer, names in LAYERS.items() if short in names), "")


def _short_name(module: str) -> str:
    """A module's name as LAYERS spells it (the flat package's modules without the prefix)."""
    return "rainbowd" if module == "rainbowd" else module.removeprefix("rainbowd.")


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


def test_every_module_is_in_one_layer() -> None:
    unplaced = sorted(m for m in _modules() if not _layer(m))
    assert not unplaced, f"place these in LAYERS (tests/unit/test_import_contracts.py): {unplaced}"
    placed = [n for names in LAYERS.values() for n in names]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    gone = set(placed) - {_short_name(m) for m in _modules()}
    assert not gone, f"LAYERS names modules that do not exist: {sorted(gone)}"


def test_layers_import_only_downwards() -> None:
    wrong = [
        f"{name} ({_layer(name)}) imports {dep} ({_layer(dep)})"
        for name, deps in sorted(_graph().items())
        for dep in sorted(deps)
        if _layer(dep) != _layer(name) and _layer(dep) not in MAY_IMPORT[_layer(name)]
    ]
    assert not wrong, "\n".join(wrong)


def test_core_does_no_io_and_reads_no_clock() -> None:
    modules = _modules()
    wrong = [
        f"{name} imports {m}"
        for name, path in sorted(modules.items())
        if _layer(name) == "core"
        for m in sorted(set(_imported(name, path)))
        if m.split(".")[0] in IO_LIBRARIES
    ]
    assert not wrong, "\n".join(wrong)


def test_nothing_of_rbd_imports_bench_or_tests() -> None:
    wrong = [
        f"{name} imports {m}"
        for name, path in sorted(_modules().items())
        for m in sorted(set(_imported(name, path)))
        if m.split(".")[0] in {"bench", "tests"}
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_but_the_known_ones() -> None:
    cycles = set(_cycles(_graph()))
    assert cycles - KNOWN_CYCLES == set(), [sorted(c) for c in cycles - KNOWN_CYCLES]
    assert KNOWN_CYCLES - cycles == set(), (
        "a known cycle is gone: drop it from KNOWN_CYCLES",
        [sorted(c) for c in KNOWN_CYCLES - cycles],
    )


def test_the_checks_see_a_violation() -> None:
    """The graph and the cycle finder catch what they are for (on a made-up graph)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _layer("rainbowd.agent.puller") == "agent"
    assert _layer("rainbowd.scheduler") == "core"
    # the agent's imports are read: it uses the store (lib) and the chunk protocol (core)
    graph = _graph()
    assert {"rainbowd.store", "rainbowd.chunkproto"} <= graph["rainbowd.agent.puller"]
