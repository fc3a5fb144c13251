"""No class over ~400 lines (the developers' guide; issue 15 item 3), checked, not hoped for.

Issue 15 found the coordinator as one class of 1,305 lines; sessions 10-13 split
it, the scheduler, the planner and the data plane's servers into classes of one
concern each. Nothing kept the next feature from growing one of them back, so
this test reads every class of src/, bench/ and tests/ (``ast``: its first line
to its last, docstring and comments included) and fails on one longer than
:data:`MAX_CLASS_LINES`. A class that must grow is split by concern, as the
planner was (rainbowd.core.sched.policies: state, seeders, demanders, fit, walk).
"""

from __future__ import annotations

import ast
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
#: the trees whose classes are measured
TREES = ("src", "bench", "tests")
#: the guide's "~400 lines": the most a class may span, first line to last
MAX_CLASS_LINES = 400


def class_lengths(source: str) -> list[tuple[str, int, int]]:
    """(name, first line, lines spanned) of every class in ``source``, nested ones too."""
    return [
        (node.name, node.lineno, (node.end_lineno or node.lineno) - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef)
    ]


def too_long(top: Path = TOP) -> list[str]:
    return [
        f"{path.relative_to(top)}:{line} {name}: {length} lines"
        for tree in TREES
        for path in sorted((top / tree).rglob("*.py"))
        for name, line, length in class_lengths(path.read_text())
        if length > MAX_CLASS_LINES
    ]


def test_no_class_is_over_the_limit() -> None:
    wrong = too_long()
    assert not wrong, f"split these by concern (at most {MAX_CLASS_LINES} lines):\n" + "\n".join(
        wrong
    )


def test_the_check_sees_a_long_class(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_CLASS_LINES))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.py").write_text(f"class Small:\n    pass\n\n\nclass Big:\n{body}\n")
    assert too_long(tmp_path) == [f"src/big.py:5 Big: {MAX_CLASS_LINES + 1} lines"]
    # and the real tree is read: the scheduler is one of its large classes
    [(_, _, length)] = [
        c
        for c in class_lengths((TOP / "src/rainbowd/core/sched/scheduler.py").read_text())
        if c[0] == "Scheduler"
    ]
    assert length > MAX_CLASS_LINES // 2
