"""structlog setup shared by every rbd process.

Processes call :func:`configure` once at start; modules only ever do
``structlog.get_logger(__name__)`` and log events with key/value context
(``node=…, layer=…``) so a log line names the node and layer involved.
"""

from __future__ import annotations

import logging
import sys

import structlog


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of the write.

    Binding the stream at :func:`configure` time breaks when a caller later swaps
    ``sys.stderr`` (pytest's capture does, per test): every log line after that
    hit a closed file ("I/O operation on closed file") inside the next test.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str = "info", json: bool | None = None) -> None:
    """Log to stderr: JSON lines when not on a terminal (systemd/journald), else console."""
    if json is None:
        json = not sys.stderr.isatty()
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # libraries (asyncssh, aiohttp) log through stdlib logging: render them the same way
    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    # asyncssh logs every connection and channel at INFO; our own events say what matters
    logging.getLogger("asyncssh").setLevel(max(lvl, logging.WARNING))
    logging.getLogger("aiohttp.access").setLevel(max(lvl, logging.WARNING))
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
