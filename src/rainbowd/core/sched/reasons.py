"""Why a transfer's seeder was chosen: a rule and the numbers that decided it.

Why a record, not a sentence: ``rbd job ID`` prints the reason, the web
console draws it on the transfer graph, ``rbd --json job ID`` and the lab's
reports are read by programs, and the state file keeps it. A sentence had to
be parsed back with regular expressions (the console's, the lab's), which
broke whenever its wording moved. So the policy that starts a transfer
(paper.py for ``paper``, policies/fit.py for the others) records
:class:`TransferReason`: the policy, the *rule* that chose the seeder, the
*turn* that put the demander first (capacity-aware policies), and the
numbers both weighed, by name. :meth:`TransferReason.render` gives the one
line people read (the same line the scheduler used to write), and every
reader takes the rule and the numbers from the fields.

The names of rules, turns and numbers are the constants below; a reason from
a newer rbd with a rule this one does not know still renders (its rule and
numbers, as they are). A reason stored by an rbd before this record existed
was free text: the state store's migration keeps it as rule ``legacy`` with
the text (coordinator/state.py, schema 3).

Bounds: the record crosses the wire only inside coordinator views and the
state file, but its fields are the bounded types of rainbowd.core.wirebounds
like every other stored field, so a stored row is checked when it is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, NamedTuple

import msgspec

from ..wirebounds import Finite, Name, Text

# -- rules: what chose the seeder ---------------------------------------------
#: the fastest idle holder of the layer (``paper``'s Algorithm 1; ``fastest``)
FASTEST_IDLE = "fastest-idle"
#: the seeder whose free upload covers the demander's free download most tightly
BEST_FIT = "best-fit"
#: a node still receiving the layer serves its chunks as they land (cut-through relay)
RELAY = "relay"
#: a small layer sent straight from one seeder to every demander waiting for it
DIRECT = "direct"
#: taken back from an agent that was already pulling it (its record was lost)
ADOPTED = "adopted"
#: written by an rbd from before this record: only its free text is known
LEGACY = "legacy"

# -- turns: why this demander was served now (capacity-aware policies) ----------
#: the speed walk: fastest waiting demander first
FASTEST_FIRST = "fastest-first"
#: least slack first: its remaining download comes close to the horizon
URGENT = "urgent"
#: it waited ``patience_s`` with nothing in flight: any seeder with room will do
STARVING = "starving"

# -- numbers, by name (a rate in bytes/s, a time in seconds, a size in bytes) --
#: the seeder's upload speed estimate
SEEDER_BPS = "seeder_bps"
#: ``paper``: idle holders of the layer slower than the seeder, left for others
SLOWER_IDLE = "slower_idle"
#: ``paper``: the demander's download cap, when it is below the seeder's speed
DOWNLOAD_CAP_BPS = "download_cap_bps"
#: the seeder's upload not reserved by other transfers when this one was planned
FREE_UP_BPS = "free_up_bps"
#: what of the demander's free download this transfer may reserve
FREE_DOWN_BPS = "free_down_bps"
#: the rate the transfer was planned at: min(free up, free down[, relay inbound])
PLANNED_BPS = "planned_bps"
#: with Rules.fair_share_s: the share of the seeder's upload the flow gets beside
#: the seeder's other flows, which is what the demander books of its download (where less
#: than the planned rate)
SHARED_BPS = "shared_bps"
#: with Rules.last_fit: the demander's whole download, which the seeder of the last piece it
#: asked for was fitted against (where more than its free download then)
FITTED_DOWN_BPS = "fitted_down_bps"
#: relay: the planned rate of the transfer bringing the layer into the relay
INBOUND_BPS = "inbound_bps"
#: relay: seconds the first chunk trails a complete copy (one hop per relay on the way)
LAG_S = "lag_s"
#: direct: the layer's size
SIZE_BYTES = "size_bytes"
#: direct: seconds a seeder may spend sending small layers (Rules.direct_s)
DIRECT_S = "direct_s"
#: fastest-first: the demander's rank (its download, or min(up, down): Rules.rank)
DEMANDER_BPS = "demander_bps"
#: urgent: seconds of download the demander still needs
NEED_S = "need_s"
#: urgent by its own bound (Rules.own_urgent): the demander's own bound in seconds
OWN_BOUND_S = "own_bound_s"
#: urgent as the horizon's setter (Rules.setter_guard): the seconds of download it still
#: needs, the slowest of the demanders', which set the slack rule's horizon
SETTER_NEED_S = "setter_need_s"
#: starving: the patience it ran out of (Rules.patience_s)
PATIENCE_S = "patience_s"
#: the seconds the demander had waited, where that let in a seeder ending the piece within
#: them (Rules.wait_credit: its need counted as at least its wait)
WAITED_S = "waited_s"

#: with Rules.late_room_share: the share of its download free that was room enough for
#: this transfer, the demander being behind the slack rule's horizon (under min_share)
LATE_ROOM_SHARE = "late_room_share"
#: with Rules.own_room_share: the share of its download free that was room enough for
#: this transfer, the demander being late by its own bound (under min_share)
OWN_ROOM_SHARE = "own_room_share"

#: the late rooms a reason may name, each with why the demander was late (its render)
_LATE_ROOMS = (
    (LATE_ROOM_SHARE, "behind the horizon"),
    (OWN_ROOM_SHARE, "late by its own bound"),
)

#: 1 where the seeder is one the demander pulled from before (Rules.peer_share): its
#: connection is open, so the transfer skips the handshake
PULLED_BEFORE = "pulled_before"

#: most numbers one reason carries (a rule's and a turn's: 7 today)
MAX_REASON_NUMBERS = 32
#: the numbers of a reason, by name
Numbers = Annotated[dict[Name, Finite], msgspec.Meta(max_length=MAX_REASON_NUMBERS)]

#: bytes/s in the MB/s people read (decimal)
_MB = 1e6
#: how a rule or a turn renders its numbers
_Render = Callable[[Mapping[str, float]], str]
#: how a rule renders its numbers and the seeder's name
_RuleRender = Callable[[Mapping[str, float], str], str]
#: what ``adopted`` renders as
_ADOPTED_TEXT = "adopted: the agent was already pulling it (unknown to this coordinator)"


class Turn(NamedTuple):
    """Why a waiting demander is served now: the walk's turn and the one number behind it."""

    name: str
    number: str
    value: float


class TransferReason(msgspec.Struct, kw_only=True):
    """Why a transfer's seeder was chosen: the rule, the demander's turn, and their numbers.

    ``rule`` and ``turn`` are names above (a newer rbd may send others);
    ``numbers`` are by the names above; ``text`` is only a legacy reason's.
    """

    rule: Name
    policy: Name = ""
    turn: Name = ""
    numbers: Numbers = {}
    text: Text = ""

    @classmethod
    def legacy(cls, text: str) -> TransferReason:
        """A reason an older rbd wrote as free text."""
        return cls(rule=LEGACY, text=text)

    @classmethod
    def adopted(cls) -> TransferReason:
        """A transfer an agent was running that this coordinator had no record of."""
        return cls(rule=ADOPTED)

    def render(self, seeder: str = "") -> str:
        """The line people read: the policy, the rule with its numbers, then the turn.

        ``seeder``: the transfer's seeder, named by the rules that speak of it (relay,
        direct); "" says "the seeder".
        """
        if self.rule == LEGACY:
            return self.text
        if self.rule == ADOPTED:
            return _ADOPTED_TEXT
        n = self.numbers
        rule = _RULES.get(self.rule)
        body = rule(n, seeder or "the seeder") if rule is not None else _as_is(self.rule, n)
        head = f"{self.policy}: {body}" if self.policy else body
        if not self.turn:
            return head
        turn = _TURNS.get(self.turn)
        said = f"{head}; {turn(n) if turn is not None else self.turn}"
        if WAITED_S in n:
            said += f"; waited {n[WAITED_S]:.1f} s, so a seeder ending the piece within that"
            said += " will do"
        for share, why in _LATE_ROOMS:
            if share in n:
                said += f"; {why}, so {n[share]:.0%} of its download free was room enough"
        if n.get(PULLED_BEFORE):
            said += "; a seeder it pulled from before (its connection is open)"
        return said


def _mb(bps: float) -> str:
    return f"{bps / _MB:.1f}"


def _fastest_idle(n: Mapping[str, float], seeder: str) -> str:
    speed = _mb(n.get(SEEDER_BPS, 0.0))
    if SLOWER_IDLE not in n:  # a capacity-aware policy without slots (``fastest``)
        return f"fastest idle seeder holding the layer ({speed} MB/s)"
    capped = ""
    if DOWNLOAD_CAP_BPS in n:
        capped = f"; expected {_mb(n[DOWNLOAD_CAP_BPS])} MB/s, the demander's download cap"
    return (
        f"fastest idle seeder holding the layer ({speed} MB/s measured; "
        f"{int(n[SLOWER_IDLE])} slower idle holder(s) left{capped})"
    )


def _shared(n: Mapping[str, float]) -> str:
    """What the demander booked where the seeder's other flows share its upload (or "")."""
    if SHARED_BPS not in n:
        return ""
    return (
        f"; {_mb(n[SHARED_BPS])} MB/s of it expected beside the seeder's other flows,"
        " booked of the download"
    )


def _best_fit(n: Mapping[str, float], seeder: str) -> str:
    if FITTED_DOWN_BPS in n:
        target = (
            f"the demander's whole {_mb(n[FITTED_DOWN_BPS])} MB/s download (its last piece; "
            f"{_mb(n.get(FREE_DOWN_BPS, 0.0))} MB/s of it free now)"
        )
    else:
        target = f"{_mb(n.get(FREE_DOWN_BPS, 0.0))} MB/s of free download"
    return (
        f"best-fit seeder, {_mb(n.get(FREE_UP_BPS, 0.0))} of its "
        f"{_mb(n.get(SEEDER_BPS, 0.0))} MB/s upload free for {target}; "
        f"planned at {_mb(n.get(PLANNED_BPS, 0.0))} MB/s{_shared(n)}"
    )


def _relay(n: Mapping[str, float], seeder: str) -> str:
    return (
        f"cut-through relay -- {seeder} is still receiving the layer (inbound planned at "
        f"{_mb(n.get(INBOUND_BPS, 0.0))} MB/s) and serves its chunks as they land; the best "
        f"fit among the layer's holders and relays for {_mb(n.get(FREE_DOWN_BPS, 0.0))} MB/s "
        f"of free download; {_mb(n.get(FREE_UP_BPS, 0.0))} of its "
        f"{_mb(n.get(SEEDER_BPS, 0.0))} MB/s upload free; planned at "
        f"{_mb(n.get(PLANNED_BPS, 0.0))} MB/s (no faster than its inbound){_shared(n)}, first "
        f"chunk {n.get(LAG_S, 0.0):.1f} s behind a complete copy"
    )


def _direct(n: Mapping[str, float], seeder: str) -> str:
    return (
        f"direct -- the layer is small ({int(n.get(SIZE_BYTES, 0.0))} B), so {seeder} "
        f"({_mb(n.get(SEEDER_BPS, 0.0))} MB/s) sends it straight to every demander within "
        f"{n.get(DIRECT_S, 0.0):g} s"
    )


def _as_is(rule: str, n: Mapping[str, float]) -> str:
    """A rule this rbd does not know (a newer coordinator's): its name and numbers."""
    numbers = ", ".join(f"{k} {v:g}" for k, v in sorted(n.items()))
    return f"{rule} ({numbers})" if numbers else rule


_RULES: dict[str, _RuleRender] = {
    FASTEST_IDLE: _fastest_idle,
    BEST_FIT: _best_fit,
    RELAY: _relay,
    DIRECT: _direct,
}


def _fastest_first(n: Mapping[str, float]) -> str:
    return f"fastest waiting demander first ({_mb(n.get(DEMANDER_BPS, 0.0))} MB/s)"


def _urgent(n: Mapping[str, float]) -> str:
    if OWN_BOUND_S in n:
        return (
            f"urgent: would end later than its own bound ({n[OWN_BOUND_S]:.1f} s) allows"
            " unless served now"
        )
    if SETTER_NEED_S in n:
        return (
            f"urgent: needs {n[SETTER_NEED_S]:.1f} s of download, the slowest, which set the"
            " horizon: kept at its pace"
        )
    return f"urgent: needs {n.get(NEED_S, 0.0):.1f} s of download, little slack"


def _starving(n: Mapping[str, float]) -> str:
    return f"waited {n.get(PATIENCE_S, 0.0):g} s or more with nothing in flight"


_TURNS: dict[str, _Render] = {
    FASTEST_FIRST: _fastest_first,
    URGENT: _urgent,
    STARVING: _starving,
}
