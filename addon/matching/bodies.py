"""Request bodies, bounded: what the sidecar holds is capped whatever the framing or the encoding.

Two ways round a cap on the declared Content-Length: a small compressed body that inflates to
gigabytes (a decompression bomb), and a chunked body that declares no length at all. The first is
decoded here with an output limit (zlib, brotli and zstd all stop at a given size), so a body never
inflates past the cap. The second is counted as it arrives (see httplayer.py).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import brotli


class OverCap(ValueError):
    """The body is (or decodes to) more than the cap."""


PIECE = 1024 * 1024  # decoded a piece at a time: a bomb costs the cap plus one piece, not twice the cap


def _bounded(pieces: Iterator[bytes], cap: int, coding: str) -> bytes:
    """The pieces joined, or OverCap as soon as they pass `cap` (nothing more is decoded)."""
    out = bytearray()
    for piece in pieces:
        out += piece
        if len(out) > cap:
            raise OverCap(f"request body ({coding}) decodes to more than durable_body_cap ({cap} bytes)")
    return bytes(out)


TRUNCATED = "the body ends before its compressed data does"


def _zlib(raw: bytes, wbits: int) -> Iterator[bytes]:
    """zlib, raw deflate or gzip; gzip members one after another (what gzip.decompress reads too)."""
    data = raw
    while True:
        decoder = zlib.decompressobj(wbits)
        while data:
            yield decoder.decompress(data, PIECE)
            data = decoder.unconsumed_tail
        yield decoder.flush()
        if not decoder.eof:
            raise ValueError(TRUNCATED)
        data = decoder.unused_data
        if not data or wbits != GZIP_WBITS:
            return


GZIP_WBITS = 47  # a gzip or zlib header, detected


def _gzip(raw: bytes) -> Iterator[bytes]:
    return _zlib(raw, GZIP_WBITS)


def _deflate(raw: bytes) -> Iterator[bytes]:
    try:
        zlib.decompressobj(15).decompress(raw[:64], 1)  # a zlib header? else raw deflate, as some clients send
    except zlib.error:
        return _zlib(raw, -15)
    return _zlib(raw, 15)


def _brotli(raw: bytes) -> Iterator[bytes]:
    # brotli 1.2's can_accept_more_data() says True while output held back by the limit remains: the
    # decoder is drained until it says the stream is finished
    decoder = brotli.Decompressor()
    yield decoder.process(raw, output_buffer_limit=PIECE)
    while not decoder.is_finished():
        piece = decoder.process(b"", output_buffer_limit=PIECE)
        if not piece:
            raise ValueError(TRUNCATED)
        yield piece


def _zstd(raw: bytes) -> Iterator[bytes]:
    """Frames one after another (what zstd.decompress reads too)."""
    try:
        from compression import zstd  # Python 3.14
    except ImportError:
        from backports import zstd  # what mitmproxy brings
    data = raw
    while data:
        decoder = zstd.ZstdDecompressor()
        yield decoder.decompress(data, max_length=PIECE)
        while not decoder.eof:
            if decoder.needs_input:
                raise ValueError(TRUNCATED)
            yield decoder.decompress(b"", max_length=PIECE)
        data = decoder.unused_data


DECODERS: dict[str, Callable[[bytes], Iterator[bytes]]] = {
    "gzip": _gzip,
    "x-gzip": _gzip,
    "deflate": _deflate,
    "br": _brotli,
    "zstd": _zstd,
}


def decode(raw: bytes, coding: str, cap: int) -> bytes:
    """A body as sent, content-decoded, never more than `cap` bytes held.

    Raises OverCap past the cap, ValueError for a body that does not decode as its
    Content-Encoding says (or an encoding nobody can decode)."""
    coding = coding.strip().lower()
    if coding in ("", "identity", "none"):
        body = raw
    else:
        decoder = DECODERS.get(coding)
        if decoder is None:
            raise ValueError(f"unsupported Content-Encoding {coding!r}")
        try:
            body = _bounded(decoder(raw), cap, coding) if raw else b""
        except OverCap:
            raise
        except Exception as e:  # zlib.error, brotli.error, ZstdError: a body that lies about its encoding
            raise ValueError(f"{coding}: {e}") from e
    if len(body) > cap:
        raise OverCap(f"request body is more than durable_body_cap ({cap} bytes)")
    return body


def json_object(data: bytes) -> dict[str, Any] | None:
    """`data` parsed when it is a JSON object (a WebSocket message, say); None for anything else,
    without a parse unless it starts with `{`."""
    if not data.lstrip().startswith(b"{"):
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
