"""Which backend holds the state: :func:`open_store` opens the one a URL names.

Apart from the package (``__init__``) so that it alone imports the backends:
they import the package's types, and the package imports none of them.
"""

from __future__ import annotations

from pathlib import Path

from . import StateStore, sqlite_file


def open_store(url: str | None, state_dir: Path) -> StateStore:
    """The store ``url`` names (None: SQLite in ``state_dir``); StateError if it cannot open.

    Imports each backend only when it is asked for, so a coordinator on SQLite
    never loads the PostgreSQL driver.
    """
    path = sqlite_file(url, state_dir)
    if path is not None:
        from .sqlite import SqliteStore

        return SqliteStore(path, work_dir=state_dir)
    from .postgres import PostgresStore

    assert url is not None  # (sqlite_file names the default file for no URL)
    return PostgresStore(url, work_dir=state_dir)
