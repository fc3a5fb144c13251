"""The rule of the in-process tests and tests/security: they do not wait, and they time nothing.

Time that matters to the code under test is a fake clock the test moves
(tests/support/waiting.py ``FakeClock``); a condition a test cannot await is waited
for through ``tests/support/waiting.py`` (``wait_until``, ``wait_until_sync``,
``settle``), the one place a sleep is written. Timing belongs to bench/.

This test reads the test files' syntax trees and fails on a call of
``time.sleep`` or ``asyncio.sleep``, or a read of a wall clock
(``time.monotonic``/``time.time``/``time.perf_counter``, a loop's ``.time()``),
outside the allow-list below -- which names each file that still does, how
many times, and why, so the count can only go down.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
#: the folders under the rule: tests of the core, of lib, of single services and processes
#: in one process, and of the tree itself (everything but integration/, faults/ and lab/,
#: which run real processes)
RULED = (
    "core",
    "lib",
    "agent",
    "coordinator",
    "cli",
    "devcluster",
    "bench",
    "contracts",
    "docs",
    "security",
)
#: the module every sleep of a test goes through
HELPER = TESTS / "support" / "waiting.py"

SLEEPS = {("time", "sleep"), ("asyncio", "sleep")}
CLOCKS = {
    ("time", name)
    for name in (
        "monotonic",
        "monotonic_ns",
        "time",
        "time_ns",
        "perf_counter",
        "perf_counter_ns",
    )
}

#: file (relative to tests/) -> (sleeps, wall-clock reads) it may still have, and why.
#: Lower a count when you remove one; never raise it: use a fake clock or tests/support/waiting.py.
ALLOWED: dict[str, tuple[int, int, str]] = {
    # drives real network namespaces and tc queues (the lab's netlab): real time is the
    # subject (a bulk flow filling a queue for 1 s); the probes' timings, in scripts run
    # in the namespaces, are the measurement
    "devcluster/test_netlab.py": (1, 0, "real tc queues: real time is what it tests"),
}


def _dotted(node: ast.expr) -> tuple[str, str] | None:
    """(``module``, ``name``) for an expression ``module.name``, else None."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    return None


def _is_loop_time(node: ast.Call) -> bool:
    """``loop.time()`` or ``asyncio.get_running_loop().time()``: the event loop's clock."""
    f = node.func
    if not (isinstance(f, ast.Attribute) and f.attr == "time" and not node.args):
        return False
    owner = f.value
    if isinstance(owner, ast.Name):
        return owner.id == "loop"
    if isinstance(owner, ast.Call):
        called = _dotted(owner.func) or ("", getattr(owner.func, "id", ""))
        return called[1] in ("get_running_loop", "get_event_loop")
    return False


def waits_and_clocks(source: str) -> tuple[list[int], list[int]]:
    """Lines of ``source`` that sleep, and lines that read a wall clock."""
    sleeps, clocks = [], []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and _dotted(node.func) in SLEEPS:
            sleeps.append(node.lineno)
        elif isinstance(node, ast.Call) and _is_loop_time(node):
            clocks.append(node.lineno)
        elif isinstance(node, ast.Call) and _dotted(node.func) in CLOCKS:
            # a call reads the clock; passing ``time.time`` on as a default clock does not
            clocks.append(node.lineno)
    return sleeps, clocks


def ruled_files() -> list[Path]:
    return sorted(p for d in RULED for p in (TESTS / d).rglob("*.py"))


def test_ruled_tests_do_not_sleep_or_read_a_wall_clock() -> None:
    found: dict[str, tuple[list[int], list[int]]] = {}
    for path in ruled_files():
        sleeps, clocks = waits_and_clocks(path.read_text())
        if sleeps or clocks:
            found[str(path.relative_to(TESTS))] = (sleeps, clocks)
    broken = []
    for name, (sleeps, clocks) in found.items():
        may_sleep, may_clock, _why = ALLOWED.get(name, (0, 0, ""))
        if len(sleeps) > may_sleep:
            broken.append(f"{name}: sleeps at lines {sleeps} (allowed {may_sleep})")
        if len(clocks) > may_clock:
            broken.append(f"{name}: reads a wall clock at lines {clocks} (allowed {may_clock})")
    assert not broken, (
        "in-process tests and tests/security do not wait or time: use a fake clock "
        "(tests/support/waiting.py FakeClock) or wait_until/settle from tests/support/waiting.py\n"
        + "\n".join(broken)
    )
    # an allowance nobody uses any more is removed, so it cannot be spent again
    stale = [
        f"{name}: allowed ({s}, {c}), has ({len(found.get(name, ([], []))[0])}, "
        f"{len(found.get(name, ([], []))[1])})"
        for name, (s, c, _why) in ALLOWED.items()
        if (len(found.get(name, ([], []))[0]), len(found.get(name, ([], []))[1])) != (s, c)
    ]
    assert not stale, "lower these allowances in ALLOWED:\n" + "\n".join(stale)


def test_the_rule_sees_what_it_forbids() -> None:
    """The checker itself: each form it must catch, and the helper's forms it must not."""
    source = (
        "import asyncio, time\n"
        "async def f(loop):\n"
        "    await asyncio.sleep(0.1)\n"
        "    time.sleep(1)\n"
        "    t0 = time.monotonic()\n"
        "    t1 = loop.time()\n"
        "    t2 = asyncio.get_running_loop().time()\n"
        "    t3 = time.perf_counter()\n"
        "    await wait_until(lambda: True, timeout=1, what='x')\n"
        "    await settle()\n"
    )
    sleeps, clocks = waits_and_clocks(source)
    assert sorted(sleeps) == [3, 4]
    assert sorted(clocks) == [5, 6, 7, 8]


def test_the_helper_is_where_the_sleeps_are() -> None:
    sleeps, _ = waits_and_clocks(HELPER.read_text())
    assert sleeps, "tests/support/waiting.py is the place a test's sleep is written"


def test_test_module_names_are_unique_across_folders() -> None:
    """pytest imports test modules by basename (rootdir-relative, no packages): two files of
    one name in two folders stop the whole collection ("import file mismatch"), as a
    session's tests/coordinator and tests/faults test_origin_standby.py once did."""
    seen: dict[str, list[str]] = {}
    for path in TESTS.rglob("*.py"):
        if path.name == "conftest.py" or "__pycache__" in path.parts:
            continue
        seen.setdefault(path.name, []).append(str(path.relative_to(TESTS)))
    twice = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not twice, f"rename one of each: {twice}"
