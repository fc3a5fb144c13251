"""The fixed cost of a transfer, measured from done reports, and the piece size it asks for.

Why: every transfer pays a cost that does not grow with its bytes -- the
assignment's way to the agent, the done report's way back and its wait in the
coordinator's queue. On an idle host that is milliseconds; in the lab, with a
hundred agents sharing a few cores, it was ~1.1 s a transfer (bench/RESULTS.md,
"Session 16": assignment 0.22 s, report 0.90 s), against 0.13 s for a 128 KiB
piece's bytes at 1 MB/s. Pieces of one chunk then spend most of their time
waiting, and 1 MiB pieces ran paper's lab 1.21 x T* instead of 1.48 x. No
fixed size suits both hosts (1 MiB pieces lose 11-19 % in the simulator with an
idle host's costs), so the piece size follows what is measured.

Each done report gives one sample: the coordinator's own time from the
assignment to the report (``elapsed``) and the demander's time for the pull
(``seconds``, from the assignment reaching it to the piece verified). Then

* ``overhead = elapsed - seconds``: the part outside the pull, and
* ``rate = bytes / seconds``: what the pull delivered.

A piece of ``P`` bytes takes ``overhead + P / rate``; the fixed part is at most
``share`` of the bytes' time when ``P >= overhead * rate / share``
(:meth:`TransferCostMeter.piece_bytes`, medians of the last ``WINDOW``
samples). ``seconds`` is the demander's word about its own pull: a sample is
kept only where it is finite, positive and within ``elapsed`` (a claim longer
than the coordinator's own measure is bounded by it), a median leaves the range
of honest samples only if more than half of the window lies, and the result is
capped at ``MAX_PIECE_BYTES``: a lie costs efficiency, never correctness.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

#: samples the medians are taken over (the most recent ones): at ~100 reports a second
#: in paper's lab, the last ~0.5 s
WINDOW = 64
#: samples needed before the meter says anything: enough that a handful of slow first
#: transfers (new connections, cold caches) do not set the size alone
MIN_SAMPLES = 16
#: the largest piece the meter asks for, whatever it measured (bytes): a piece is what a
#: stalled source costs, and a layer keeps several pieces to be fed from several seeders
MAX_PIECE_BYTES = 8 * 1024 * 1024


class TransferCostMeter:
    """Medians of the fixed cost and the rate of recent transfers (module docstring)."""

    def __init__(self, window: int = WINDOW, min_samples: int = MIN_SAMPLES) -> None:
        if window < 1 or not 1 <= min_samples <= window:
            raise ValueError(f"need 1 <= min_samples <= window, got {min_samples}, {window}")
        self.min_samples = min_samples
        self._overhead: deque[float] = deque(maxlen=window)
        self._rate: deque[float] = deque(maxlen=window)

    def add(self, elapsed: float, seconds: float, nbytes: int) -> bool:
        """One done report: ``nbytes`` in ``seconds`` of pull, ``elapsed`` since assigned.

        False (and nothing kept) where the sample says nothing: no bytes, a pull
        time that is not a positive finite number (or so small the rate overflows),
        or an elapsed time that is not.
        """
        if nbytes <= 0 or not (math.isfinite(seconds) and math.isfinite(elapsed)):
            return False
        if seconds <= 0 or elapsed <= 0:
            return False
        seconds = min(seconds, elapsed)
        rate = nbytes / seconds
        if not math.isfinite(rate):
            return False  # a pull time too small to divide by (5e-324 s)
        self._overhead.append(elapsed - seconds)
        self._rate.append(rate)
        return True

    @property
    def samples(self) -> int:
        return len(self._overhead)

    def overhead_s(self) -> float:
        """Median fixed cost of a transfer (seconds; 0 until ``min_samples``)."""
        if len(self._overhead) < self.min_samples:
            return 0.0
        return statistics.median(self._overhead)

    def rate_Bps(self) -> float:
        """Median rate of a pull (bytes per second; 0 until ``min_samples``)."""
        if len(self._rate) < self.min_samples:
            return 0.0
        return statistics.median(self._rate)

    def piece_bytes(self, share: float) -> int:
        """Smallest piece whose fixed cost is at most ``share`` of its bytes' time.

        ``overhead * rate / share`` (module docstring), capped at
        ``MAX_PIECE_BYTES``; 0 while too few samples are in or ``share`` <= 0.
        """
        if share <= 0 or len(self._overhead) < self.min_samples:
            return 0
        need = self.overhead_s() * self.rate_Bps() / share
        return int(min(need, MAX_PIECE_BYTES))
