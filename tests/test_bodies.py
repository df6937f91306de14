"""Request bodies, bounded (matching/bodies.py), its pure logic: every Content-Encoding decodes to
the bytes sent, a piece at a time past one piece, up to the cap and not a byte past it, and a body
that lies about its encoding is an error of its own. The live refusals (413, nothing forwarded,
the proxy's memory) are in test_body_bounds.py."""

from __future__ import annotations

import gzip
import os
import tracemalloc
import zlib
from collections.abc import Callable

import brotli
import pytest

from durable_sidecar.matching import bodies
from durable_sidecar.matching.bodies import OverCap

try:
    from compression import zstd  # Python 3.14
except ImportError:
    from backports import zstd


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,  # zlib-wrapped, as the standard says
    "br": brotli.compress,
    "zstd": zstd.compress,
}
# several pieces, and not compressible to nothing: each decoder's loop runs more than once
BODY = os.urandom(bodies.PIECE // 2) * 7 + b"end"


@pytest.mark.parametrize("coding", list(ENCODERS))
def test_each_encoding_decodes_to_the_bytes_sent(coding: str) -> None:
    assert bodies.decode(ENCODERS[coding](BODY), coding, len(BODY)) == BODY
    assert bodies.decode(ENCODERS[coding](BODY), f" {coding.upper()} ", len(BODY)) == BODY


def test_a_raw_deflate_body_decodes_too() -> None:
    """Some clients send deflate without its zlib header."""
    assert bodies.decode(raw_deflate(BODY), "deflate", len(BODY)) == BODY


@pytest.mark.parametrize("coding", list(ENCODERS))
def test_a_body_one_byte_past_the_cap_is_over_it(coding: str) -> None:
    with pytest.raises(
        OverCap,
        match=f"^request body \\({coding}\\) decodes to more than durable_body_cap \\({len(BODY) - 1} bytes\\)$",
    ):
        bodies.decode(ENCODERS[coding](BODY), coding, len(BODY) - 1)


@pytest.mark.parametrize("coding", ["", "identity", "none", "Identity"])
def test_an_unencoded_body_is_itself_and_bounded_by_its_size(coding: str) -> None:
    assert bodies.decode(b"abc", coding, 3) == b"abc"
    with pytest.raises(OverCap, match="^request body is more than durable_body_cap \\(2 bytes\\)$"):
        bodies.decode(b"abc", coding, 2)


@pytest.mark.parametrize("coding", list(ENCODERS))
def test_an_empty_encoded_body_is_empty(coding: str) -> None:
    assert bodies.decode(b"", coding, 0) == b""


@pytest.mark.parametrize("coding", list(ENCODERS))
def test_a_body_that_lies_about_its_encoding_is_an_error_not_a_cap(coding: str) -> None:
    with pytest.raises(ValueError, match=f"^{coding}: ") as raised:
        bodies.decode(b"\x1f\x8b\x08 this is not compressed at all" * 10, coding, 1 << 20)
    assert not isinstance(raised.value, OverCap)


def test_an_encoding_nobody_decodes_is_named() -> None:
    with pytest.raises(ValueError, match="^unsupported Content-Encoding 'compress'$"):
        bodies.decode(b"x", "compress", 10)


@pytest.mark.parametrize("coding", list(ENCODERS))
def test_a_bomb_is_stopped_at_the_cap_plus_a_piece(coding: str) -> None:
    """64 MiB of zeros compress to little; decoding stops once the cap is passed, holding at most the
    cap and a piece or two (not the 64 MiB)."""
    bomb = ENCODERS[coding](bytes(64 << 20))
    cap = 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(OverCap):
            bodies.decode(bomb, coding, cap)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < cap + 4 * bodies.PIECE + 2 * len(bomb), f"{peak} bytes held to refuse a {coding} bomb"


@pytest.mark.parametrize("coding", list(ENCODERS))
def test_a_body_cut_short_is_an_error_not_its_first_part(coding: str) -> None:
    """A compressed body that ends before its compressed data does is a body that lies about its
    encoding: fingerprinting its first part would match it to another request's step."""
    with pytest.raises(ValueError, match=f"^{coding}: the body ends before its compressed data does"):
        bodies.decode(ENCODERS[coding](BODY)[:-50], coding, 1 << 30)


def test_gzip_members_and_zstd_frames_one_after_another_are_all_read() -> None:
    assert bodies.decode(gzip.compress(b"one ") + gzip.compress(b"two"), "gzip", 100) == b"one two"
    assert bodies.decode(zstd.compress(b"one ") + zstd.compress(b"two"), "zstd", 100) == b"one two"


def test_two_large_brotli_bodies_that_differ_only_at_the_end_get_different_fingerprints() -> None:
    """brotli 1.2 reports it can take more input while it still holds output back: decoding stopped
    after the first ~2 MB, so these two bodies shared a fingerprint (and one got the other's answer)."""
    from durable_sidecar.matching import fingerprint as fp

    def key(body: bytes) -> str:
        parts = fp.RequestParts(
            "POST",
            "https",
            "h",
            443,
            "/upload",
            [("Content-Type", "application/octet-stream"), ("Content-Encoding", "br")],
            brotli.compress(body),
        )
        return fp.match(parts, None, 1 << 30, fp.MatchRules())[2]

    assert key(BODY + b"A") != key(BODY + b"B")
