"""The pure helpers of the BitTorrent baseline (torrent pieces, info hashes, scrapes, hooks).

The baselines themselves run for real, side by side with rbd, on the ci
profile in tests/lab/test_lab.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bench.lab.bittorrent_system import (
    bdecode,
    info_hash,
    layers_done,
    piece_length,
    scrape_counts,
)


# -- the pure helpers of the BitTorrent system -----------------------------------
def test_piece_length_is_256k_for_small_layers_and_grows_for_big_ones() -> None:
    assert piece_length(10_000) == 256 * 1024
    assert piece_length(400 << 20) == 256 * 1024
    assert piece_length(1 << 30) == 512 * 1024  # 2048 pieces, not 4096
    assert piece_length(1 << 40) == 16 << 20  # capped


def test_info_hash_is_sha1_of_the_info_dict_as_written() -> None:
    info = b"d6:lengthi5e4:name3:abc12:piece lengthi32768e6:pieces20:" + b"x" * 20 + b"e"
    torrent = b"d8:announce9:http://t/4:info" + info + b"e"
    assert info_hash(torrent) == hashlib.sha1(info).digest()
    assert bdecode(torrent)[0][b"info"][b"name"] == b"abc"


def test_scrape_counts() -> None:
    ih = b"\x01" * 20
    body = b"d5:filesd20:" + ih + b"d8:completei3e10:downloadedi0e10:incompletei2eeee"
    assert scrape_counts(body, ih) == (3, 2)
    assert scrape_counts(body, b"\x02" * 20) == (0, 0)
    assert scrape_counts(b"garbage", ih) == (0, 0)


def test_layers_done_needs_every_layer_and_reports_a_bad_digest(tmp_path: Path) -> None:
    (tmp_path / "aa.ok").write_text("105.5\n")
    assert layers_done(tmp_path, ["aa", "bb"], 100.0) is None
    (tmp_path / "bb.ok").write_text("107.25\n")
    assert layers_done(tmp_path, ["aa", "bb"], 100.0) == pytest.approx(7.25)
    (tmp_path / "bb.bad").write_text("sha256 of the downloaded file is cc\n")
    assert "sha256:bb failed its digest check" in str(layers_done(tmp_path, ["aa", "bb"], 100.0))
