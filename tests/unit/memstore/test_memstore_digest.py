import os

import pytest
import xxhash

from memstore.digest import DIGEST_SIZE, chunk_digests, diff_chunks, page_digest
from memstore.layout import PAGE_SIZE


def test_chunk_digests_and_diff():
    a = bytearray(os.urandom(10 * PAGE_SIZE))
    b = bytearray(a)
    da = chunk_digests(memoryview(a), chunk_pages=4)
    assert len(da) == 3 * DIGEST_SIZE  # 4 + 4 + 2 (short last chunk)
    assert da[:16] == xxhash.xxh3_128_digest(bytes(a[: 4 * PAGE_SIZE]))
    assert da[32:] == xxhash.xxh3_128_digest(bytes(a[8 * PAGE_SIZE :]))
    assert diff_chunks(da, chunk_digests(memoryview(b), 4)) == []
    b[5 * PAGE_SIZE] ^= 1
    b[9 * PAGE_SIZE + 4095] ^= 0x80
    assert diff_chunks(da, chunk_digests(memoryview(b), 4)) == [1, 2]


def test_chunk_digests_default_is_1mib_chunks():
    buf = bytearray(3 << 20)
    assert len(chunk_digests(memoryview(buf))) == 3 * DIGEST_SIZE
    assert chunk_digests(memoryview(bytearray(0))) == b""
    with pytest.raises(ValueError):
        chunk_digests(memoryview(buf), 0)


def test_diff_chunks_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="differ in length"):
        diff_chunks(bytes(32), bytes(48))
    with pytest.raises(ValueError, match="multiple of 16"):
        diff_chunks(bytes(20), bytes(20))


def test_page_digest():
    page = os.urandom(PAGE_SIZE)
    assert page_digest(memoryview(page)) == xxhash.xxh3_64_intdigest(page)
    assert page_digest(page) != page_digest(bytes(PAGE_SIZE))
