"""Report ids: what makes an agent's final report safe to send twice.

An agent sends each final report (transfer done/failed, op started/result,
ingest and load done/failed) with a fresh random id in the
:data:`REPORT_ID_HEADER` header, and sends the *same* id on every retry of
that report. The coordinator remembers the ids it applied
(coordinator/http/report_ids.py): a retry whose first attempt was applied -- the
answer was lost, the coordinator restarted, its disk was full on the way
back -- is answered 204 and not applied again. Shared by both sides so they
agree on the header and on what a valid id looks like.
"""

from __future__ import annotations

import re
import secrets

#: HTTP header carrying the report id (ASCII, see :func:`valid`)
REPORT_ID_HEADER = "Rbd-Report-Id"
#: longest id accepted: ours are 32 hex characters; room for other clients' UUIDs
MAX_REPORT_ID = 64
_VALID = re.compile(rf"[A-Za-z0-9._-]{{8,{MAX_REPORT_ID}}}")


def new_report_id() -> str:
    """A fresh id for one report (128 random bits: no two reports share one)."""
    return secrets.token_hex(16)


def valid(report_id: str) -> bool:
    """8..64 characters of ``A-Z a-z 0-9 . _ -`` (fits a header, a log line and a key)."""
    return _VALID.fullmatch(report_id) is not None
