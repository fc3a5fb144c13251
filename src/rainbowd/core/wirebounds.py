"""Bounded field types of the control-plane messages: every number and string has a limit.

A control-plane body comes from an enrolled node or an admin client, and the
coordinator stores, schedules with and serves back what it says. One ``NaN``
speed hint used to be stored as JSON ``null`` and stop the coordinator from
starting; ``disk_free=10**30`` broke ``rbd nodes``. So every field of every
message the coordinator decodes is one of the types below: msgspec checks
the bound while decoding (a ``NaN`` fails any bound, ``inf`` fails the upper
one) and the refusal names the field, e.g. ``Expected `float` <= 1e13 - at
`$.speed_hint_bps```, which the HTTP layer answers with 400.

Strings are checked too: the decoders accept only valid UTF-8 (no lone
surrogates, which could not be stored or logged), and each string kind has a
length limit. Lists and maps have a length limit.

The limits are generous: each is far above anything a real node sends, and
low enough that no value can overflow, lose precision in a browser (2**53)
or blow up the coordinator's memory. README ("Limits") lists them.
"""

from __future__ import annotations

import sys
from typing import Annotated

import msgspec

#: any byte count or size: 2**53 (8 PiB) is the largest integer a JSON number
#: (a JavaScript double, in the web console) holds exactly
MAX_BYTES = 2**53
#: any rate in bytes/s: 10 TB/s (80 Tbit/s) is beyond every link
MAX_RATE_BPS = 1e13
#: any duration in seconds (a transfer, a load, an op's wait): one year
MAX_SECONDS = 366 * 24 * 3600.0
#: a load average: far above any real host's, below anything that overflows
MAX_LOAD = 1e6
#: counts of chunks, layers, cursors and versions: 2**32
MAX_COUNT = 2**32
#: integers in a query string (cursors, ids, limits): exact in a double, and far below
#: SQLite's INTEGER (2**63 - 1), which refused ?after=99999999999999999999 with a 500
MAX_QUERY_INT = 2**53
#: a protocol version, an exit code: a 32-bit signed integer
MAX_INT32 = 2**31 - 1

#: node ids, addresses, transfer/job/op ids, label keys and values, roles
MAX_NAME = 256
#: a digest: "sha256:" + 64 hex (room for sha512)
MAX_DIGEST = 7 + 128
#: secrets (join token, credential): new_token() makes 43 characters
MAX_SECRET = 512
#: an OpenSSH public key line (a 16384-bit RSA key is about 2.8 KB)
MAX_SSH_KEY = 16 * 1024
#: image refs, file paths, reasons, error details, one-line summaries
MAX_TEXT = 4096
#: an image's config JSON (verbatim): real ones are a few KB
MAX_CONFIG = 1024 * 1024
#: a registry manifest or index kept verbatim (issue 17: the upstream's bytes, served by
#: every node's registry front door): a 1,000-layer manifest is about 200 KB, and
#: registries themselves refuse manifests over 4 MiB; a larger one is not kept (the
#: image is served under rbd's own manifest instead)
MAX_MANIFEST = 1024 * 1024
#: an op's output and error (the agent sends the last 32 KiB of a log)
MAX_OUTPUT = 64 * 1024

#: layers a heartbeat or registration may list as held: 20,000 layers are about
#: 2,000 images; more is refused (400) rather than stored (the coordinator also
#: ignores digests that are not layers of any image it knows)
MAX_HOLDINGS = 20_000
#: transfers in flight or partial layers one heartbeat may list
MAX_ACTIVE = 1_000
#: layers of one image (Docker's overlay2 stops at 128)
MAX_LAYERS = 1_000
#: labels and roles of a node
MAX_LABELS = 64
#: targets of a job or op (node ids, or ["all"]), layers of an eviction, command words
MAX_ITEMS = 10_000

# -- numbers -------------------------------------------------------------
Bytes = Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
Int32 = Annotated[int, msgspec.Meta(ge=-MAX_INT32 - 1, le=MAX_INT32)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_RATE_BPS)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_SECONDS)]
Load = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_LOAD)]
#: a value the coordinator computes itself: only finite (NaN and inf fail)
Finite = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]

# -- strings -------------------------------------------------------------
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME)]
Digest = Annotated[str, msgspec.Meta(max_length=MAX_DIGEST)]
Secret = Annotated[str, msgspec.Meta(max_length=MAX_SECRET)]
SshKey = Annotated[str, msgspec.Meta(max_length=MAX_SSH_KEY)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
ConfigText = Annotated[str, msgspec.Meta(max_length=MAX_CONFIG)]
ManifestText = Annotated[str, msgspec.Meta(max_length=MAX_MANIFEST)]
Output = Annotated[str, msgspec.Meta(max_length=MAX_OUTPUT)]

# -- collections ---------------------------------------------------------
Holdings = Annotated[list[Digest], msgspec.Meta(max_length=MAX_HOLDINGS)]
Digests = Annotated[list[Digest], msgspec.Meta(max_length=MAX_ITEMS)]
Names = Annotated[list[Name], msgspec.Meta(max_length=MAX_ITEMS)]
Roles = Annotated[list[Name], msgspec.Meta(max_length=MAX_LABELS)]
Labels = Annotated[dict[Name, Name], msgspec.Meta(max_length=MAX_LABELS)]
Words = Annotated[list[Text], msgspec.Meta(max_length=MAX_ITEMS)]
