"""ARCHITECTURE.md names only what exists: paths, ``rainbowd.…`` modules, classes, methods.

The page is for the engineer who carries rbd on; a page naming a module that
was renamed or a class that was merged away misleads more than no page. So
every name it writes in code style is checked against the tree:

- a repository path (an inline code span with a ``/`` or a file suffix, or
  the first word of a line in a fenced ``text`` block) must exist;
- a ``rainbowd.…`` name must be a module of rbd (a file under src/rainbowd),
  or a module and one name defined at its top level;
- a ``ClassName``, ``ClassName.method`` or ``CONSTANT`` must be defined at the
  top level of some module of rbd, bench/ or tests/ (a method: in such a class).

Folders that do not exist yet are named in plain text, never in code style.
The pages the map sends the reader to for detail (docs/*.md: the standby
coordinator, the registry front door) are held to the same rules. Every
folder of the package is on the map's layout block, README.md's layout block
(fenced ``text``) is held to the path rule and names every folder too, and
README must point to ARCHITECTURE.md. The map stays about a page
(:data:`MAX_ARCHITECTURE_LINES`): detail goes to docs/.

Pure file reading and ``ast``: no process, no network, well under a second.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARCHITECTURE = REPO / "ARCHITECTURE.md"
README = REPO / "README.md"
#: the pages of detail ARCHITECTURE.md points to
DETAIL_PAGES = sorted((REPO / "docs").glob("*.md"))
#: issue 15's "one page", give or take: the map grew to 598 lines as features landed in it
#: (session 14 moved the standby's and the front door's detail to docs/)
MAX_ARCHITECTURE_LINES = 420
#: where the package's modules live (every layer is a folder of it)
PACKAGE = REPO / "src" / "rainbowd"
#: trees whose top-level definitions a class or constant name may refer to
DEFINING_TREES = ("src", "bench", "tests")
#: suffixes that make a code span a file path even without a slash
FILE_SUFFIXES = (".py", ".md", ".toml", ".json", ".sh")
#: fewest names of each kind the page must yield: a parser that finds nothing proves nothing
MIN_PATHS, MIN_MODULES, MIN_NAMES = 30, 10, 40

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SPAN = re.compile(r"`([^`\n]+)`")
MODULE = re.compile(r"^rainbowd(\.\w+)*$")
CLASS = re.compile(r"^_?[A-Z][a-z]\w*(\.\w+)?$")
CONSTANT = re.compile(r"^[A-Z][A-Z0-9_]+$")


def _spans(text: str) -> list[str]:
    """Inline code spans outside fenced blocks."""
    return SPAN.findall(FENCE.sub("", text))


def _text_block_paths(text: str) -> list[str]:
    """The first word of each unindented line of the fenced ``text`` blocks."""
    return [
        line.split()[0]
        for lang, body in FENCE.findall(text)
        if lang == "text"
        for line in body.splitlines()
        if line and not line[0].isspace()
    ]


def _is_path(span: str) -> bool:
    if " " in span or span.startswith(("/", "~", "http")) or any(c in span for c in "<{*$"):
        return False
    return "/" in span or span.endswith(FILE_SUFFIXES)


def _module_path(module: str) -> Path | None:
    """The file of an rbd module (``rainbowd.agent.dataplane.puller``), or None."""
    first, *rest = module.split(".")
    if first != PACKAGE.name:
        return None
    folder = PACKAGE.joinpath(*rest)
    for path in (folder / "__init__.py", folder.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _top_level(tree: ast.Module) -> dict[str, ast.stmt]:
    """Names a module defines at its top level (classes, functions, assignments)."""
    out: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


@cache
def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@cache
def _definitions() -> dict[str, list[ast.stmt]]:
    """Every top-level name in rbd, bench/ and tests/, with where it is defined."""
    out: dict[str, list[ast.stmt]] = {}
    for tree in DEFINING_TREES:
        for path in sorted((REPO / tree).rglob("*.py")):
            for name, node in _top_level(_parsed(path)).items():
                out.setdefault(name, []).append(node)
    return out


def _module_problem(name: str) -> str:
    """Why ``name`` (rainbowd.x or rainbowd.x.Name) names nothing; "" when it exists."""
    if _module_path(name) is not None:
        return ""
    module, _, attr = name.rpartition(".")
    path = _module_path(module)
    if path is None:
        return f"{name}: no such module"
    if attr not in _top_level(_parsed(path)):
        return f"{name}: {path.relative_to(REPO)} defines no {attr}"
    return ""


def _name_problem(name: str) -> str:
    """Why a ``Class``, ``Class.method`` or ``CONSTANT`` names nothing; "" when it exists."""
    owner, _, member = name.partition(".")
    found = _definitions().get(owner, [])
    if not found:
        return f"{owner}: defined nowhere in {', '.join(DEFINING_TREES)}"
    if not member:
        return ""
    classes = [n for n in found if isinstance(n, ast.ClassDef)]
    if any(_top_level(ast.Module(body=c.body, type_ignores=[])).get(member) for c in classes):
        return ""
    return f"{name}: no class {owner} has {member}"


def _problems(text: str, *, names: bool) -> tuple[list[str], dict[str, int]]:
    spans = _spans(text)
    paths = sorted({s for s in spans if _is_path(s)} | set(_text_block_paths(text)))
    modules = sorted({s for s in spans if MODULE.match(s)}) if names else []
    idents = sorted({s for s in spans if CLASS.match(s) or CONSTANT.match(s)}) if names else []
    problems = [f"{p}: no such path in the repository" for p in paths if not (REPO / p).exists()]
    problems += [why for m in modules if (why := _module_problem(m))]
    problems += [why for n in idents if (why := _name_problem(n))]
    return problems, {"paths": len(paths), "modules": len(modules), "names": len(idents)}


def test_architecture_names_only_what_exists() -> None:
    problems, counts = _problems(ARCHITECTURE.read_text(), names=True)
    assert not problems, "ARCHITECTURE.md is out of date:\n" + "\n".join(problems)
    assert counts["paths"] >= MIN_PATHS, counts
    assert counts["modules"] >= MIN_MODULES, counts
    assert counts["names"] >= MIN_NAMES, counts


def test_detail_pages_name_only_what_exists() -> None:
    assert DETAIL_PAGES, "docs/ has no page"
    architecture = ARCHITECTURE.read_text()
    for page in DETAIL_PAGES:
        problems, _ = _problems(page.read_text(), names=True)
        assert not problems, f"{page.relative_to(REPO)} is out of date:\n" + "\n".join(problems)
        name = str(page.relative_to(REPO))
        assert name in architecture, f"ARCHITECTURE.md never points to {name}"


def test_architecture_stays_about_a_page() -> None:
    lines = len(ARCHITECTURE.read_text().splitlines())
    assert lines <= MAX_ARCHITECTURE_LINES, (
        f"ARCHITECTURE.md has {lines} lines: move detail to a page of docs/ and point to it"
    )


def _package_folders() -> list[str]:
    """Every folder of the package that holds modules, as ``src/rainbowd/agent/mirror/``."""
    inits = [p for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE]
    return sorted(f"{p.parent.relative_to(REPO)}/" for p in inits)


def test_every_folder_is_on_the_map() -> None:
    """ARCHITECTURE.md's layout names each folder of the package; README's names each too."""
    folders = _package_folders()
    assert "src/rainbowd/agent/mirror/" in folders  # the walk sees sub-folders
    on_map = set(_text_block_paths(ARCHITECTURE.read_text()))
    assert not set(folders) - on_map, sorted(set(folders) - on_map)
    readme_layout = "\n".join(
        body for lang, body in FENCE.findall(README.read_text()) if lang == "text"
    )
    missing = [f for f in folders if f.split("/")[-2] + "/" not in readme_layout]
    assert not missing, f"README.md's layout does not name {missing}"


def test_readme_layout_agrees_and_points_to_architecture() -> None:
    text = README.read_text()
    problems, _ = _problems(text, names=False)
    layout = _text_block_paths(text)
    layers = {f"src/rainbowd/{layer}/" for layer in ("core", "lib", "agent", "coordinator", "cli")}
    assert layers | {"src/rainbowd/devcluster/", "bench/", "tests/"} <= set(layout), layout
    assert not problems, "README.md names paths that do not exist:\n" + "\n".join(problems)
    assert "ARCHITECTURE.md" in text


def test_the_checks_see_a_wrong_name() -> None:
    """Each rule refuses what it is for (made-up names), so a pass means something."""
    problems, _ = _problems(
        "`agent/nothing.py` `rainbowd.nothing` `rainbowd.lib.store.Nothing` `NoSuchClass`"
        " `LayerStore.no_such_method` `NO_SUCH_CONSTANT`\n```text\nnowhere/   x\n```\n",
        names=True,
    )
    assert len(problems) == 7, problems
    ok, _ = _problems(
        "`src/rainbowd/agent/dataplane/puller.py` `rainbowd.lib.store` `rainbowd.agent`"
        " `rainbowd.lib.store.LayerStore` `LayerPuller.pull` `DEFAULT_POLICY`"
        " `rainbowd.agent.dataplane.relay`",
        names=True,
    )
    assert ok == [], ok
