"""REST request bodies sent with a ``Content-Encoding``: inflated here, never past the request-size limit.

TF Serving's HTTP server inflates gzip request bodies. aiohttp would too, but its decoder goes on inflating a
body to its end after the handler has refused it at ``client_max_size``: a 0.5 MB gzip of 500 MiB cost the
server about 2 s of CPU each time, and eight of them raised its memory by up to 1.6 GiB (docs/RELIABILITY.md).
So the REST transport takes the bytes as sent (``auto_decompress=False``) and inflates them here, stopping one
byte past the limit.

Accepted codings: ``gzip`` (``x-gzip``), ``deflate`` (zlib-wrapped, or raw as some clients send it) and
``identity``, listed in the order they were applied (RFC 9110), case-insensitively.
"""

from __future__ import annotations

import zlib

from carclf.errors import InvalidInput, RequestTooLarge

GZIP, DEFLATE, IDENTITY = "gzip", "deflate", "identity"
ALIASES = {"gzip": GZIP, "x-gzip": GZIP, "deflate": DEFLATE, "identity": IDENTITY}


def codings(header: str | None) -> list[str]:
    """The codings of a ``Content-Encoding`` header to undo, in the order applied; ``identity`` dropped.

    Raises InvalidInput naming a coding this server cannot undo (``br``, ``zstd``, ``compress``...)."""
    found = []
    for item in (header or "").split(","):
        name = item.strip().lower()
        if not name:
            continue
        if name not in ALIASES:
            raise InvalidInput(f"unsupported Content-Encoding {item.strip()!r}: this server inflates gzip and "
                               "deflate request bodies; nothing was run")
        if ALIASES[name] != IDENTITY:
            found.append(ALIASES[name])
    return found


def decode(body: bytes, applied: list[str], limit: int) -> bytes:
    """Undo ``applied`` (from ``codings``), last first. Raises RequestTooLarge as soon as the inflated body
    would pass ``limit`` bytes, and InvalidInput for a body that is not whole, valid data of its coding."""
    for coding in reversed(applied):
        body = _inflate(body, coding, limit)
    return body


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    if not data:  # no body at all: nothing to inflate (the JSON parser names an empty document)
        return data
    if coding == GZIP:
        wbits = 16 + zlib.MAX_WBITS
    else:  # RFC 1950 zlib data starts with a byte whose low four bits are 8 (deflate); raw deflate does not
        wbits = zlib.MAX_WBITS if data[:1] and data[0] & 0x0F == 8 else -zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the request body is not valid {coding} data ({exc}); nothing was run") from None
    if len(out) > limit:
        raise RequestTooLarge(f"the {coding} request body inflates to more than the limit of {limit} bytes "
                              "(--max_request_bytes); nothing was run")
    if not inflater.eof:
        raise InvalidInput(f"the {coding} request body ends before its compressed data does (a cut-short "
                           "upload?); nothing was run")
    if inflater.unused_data:
        raise InvalidInput(f"the request body has {len(inflater.unused_data)} bytes after the end of its {coding} "
                           "data; nothing was run")
    return out
