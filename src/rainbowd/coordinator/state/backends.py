"""Which backend holds the state: :func:`open_store` opens the one a URL names.

Apart from the package (``__init__``) so that it alone imports the backends:
they import the package's types, and the package imports none of them.
"""

from __future__ import annotations

from pathlib import Path

from . import SQLITE_FILE, StateStore, check_url


def open_store(url: str | None, state_dir: Path) -> StateStore:
    """The store ``url`` names (None: SQLite in ``state_dir``); StateError if it cannot open.

    Imports each backend only when it is asked for, so a coordinator on SQLite
    never loads the PostgreSQL driver.
    """
    if not url:
        from .sqlite import SqliteStore

        return SqliteStore(state_dir / SQLITE_FILE)
    check_url(url)
    if url.startswith("sqlite:"):
        from .sqlite import SqliteStore

        return SqliteStore(Path(url.removeprefix("sqlite://")), work_dir=state_dir)
    from .postgres import PostgresStore

    return PostgresStore(url, work_dir=state_dir)
