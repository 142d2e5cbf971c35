"""serving/content_coding.py: Content-Encoding of REST bodies undone within the request-size limit.

Over real HTTP these cases run in the bad-input table (``tests/reliability/bad_inputs.py``: gzip_body,
deflate_body, gzip_bomb, corrupt_gzip, cut_short_gzip, unsupported_encoding); here the function itself.
"""

from __future__ import annotations

import base64
import gzip
import random
import tracemalloc
import zlib

import pytest

from carclf.errors import InvalidInput, RequestTooLarge
from carclf.serving import content_coding

BODY = b'{"instances": [{"b64": "' + base64.b64encode(random.Random(0).randbytes(15_000)) + b'"}]}'


def zlib_deflate(data: bytes) -> bytes:
    return zlib.compress(data)


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize("header,expected", [
    (None, []), ("", []), ("identity", []), ("gzip", ["gzip"]), ("x-gzip", ["gzip"]), ("GZip", ["gzip"]),
    ("deflate", ["deflate"]), (" identity , gzip ", ["gzip"]), ("deflate, gzip", ["deflate", "gzip"]),
])
def test_codings_of_a_header_in_the_order_applied(header, expected):
    assert content_coding.codings(header) == expected


@pytest.mark.parametrize("header", ["br", "zstd", "compress", "gzip, br", "gzip;q=1"])
def test_a_coding_the_server_cannot_undo_is_named(header):
    with pytest.raises(InvalidInput) as error:
        content_coding.codings(header)
    assert "unsupported Content-Encoding" in error.value.message
    assert repr(header.split(",")[-1].strip()) in error.value.message


@pytest.mark.parametrize("coding,encode", [("gzip", gzip.compress), ("deflate", zlib_deflate),
                                          ("deflate", raw_deflate)], ids=["gzip", "zlib_deflate", "raw_deflate"])
def test_round_trip(coding, encode):
    assert content_coding.decode(encode(BODY), [coding], limit=len(BODY)) == BODY


def test_codings_are_undone_last_first():
    sent = gzip.compress(zlib_deflate(BODY))  # deflate applied first, then gzip
    assert content_coding.decode(sent, content_coding.codings("deflate, gzip"), limit=len(BODY)) == BODY


def test_the_limit_is_on_the_inflated_size_exactly():
    sent = gzip.compress(BODY)
    assert content_coding.decode(sent, ["gzip"], limit=len(BODY)) == BODY
    with pytest.raises(RequestTooLarge) as error:
        content_coding.decode(sent, ["gzip"], limit=len(BODY) - 1)
    assert f"limit of {len(BODY) - 1} bytes" in error.value.message


def test_a_bomb_is_refused_without_inflating_past_the_limit():
    """256 MiB of zeros in 250 KB of gzip, against a 4 MiB limit: refused, and the largest allocation while
    refusing it is a small multiple of the limit (zlib joins its output blocks at the end), not 256 MiB."""
    limit = 4 << 20
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    bomb = b"".join(packer.compress(block) for _ in range(256)) + packer.flush()
    assert len(bomb) < limit // 2
    tracemalloc.start()
    try:
        with pytest.raises(RequestTooLarge):
            content_coding.decode(bomb, ["gzip"], limit=limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * limit, f"peak {peak} bytes while refusing a bomb with a limit of {limit}"


@pytest.mark.parametrize("sent,coding,needle", [
    (BODY, "gzip", "not valid gzip data"),
    (gzip.compress(BODY, mtime=0)[:-8], "gzip", "ends before its compressed data does"),
    (gzip.compress(BODY, mtime=0)[:100], "gzip", "ends before its compressed data does"),
    (gzip.compress(BODY, mtime=0) + gzip.compress(b"{}", mtime=0), "gzip", "bytes after the end of its gzip data"),
    (zlib_deflate(BODY)[:-3], "deflate", "ends before its compressed data does"),
    (b"\x08\xff\xff\xff", "deflate", "not valid deflate data"),
], ids=["not_gzip", "gzip_trailer_cut", "gzip_cut_to_100_bytes", "second_gzip_member", "zlib_cut_short",
        "bad_deflate_stream"])
def test_a_body_that_is_not_whole_valid_data_is_refused_by_name(sent, coding, needle):
    with pytest.raises(InvalidInput) as error:
        content_coding.decode(sent, [coding], limit=len(BODY))
    assert needle in error.value.message
    assert "nothing was run" in error.value.message


def test_an_empty_body_stays_empty():
    """Nothing to inflate: the JSON parser then names the empty document, as for a plain empty body."""
    assert content_coding.decode(b"", ["gzip"], limit=10) == b""
