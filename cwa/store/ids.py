"""Time-sortable run ids (ULIDs: 48-bit millisecond timestamp + 80 random bits, Crockford base32).

Ids generated in the same millisecond by one process stay strictly increasing (monotonic
ULID), so sorting run ids sorts runs by creation time.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_lock = threading.Lock()
_last: tuple[int, int] = (0, 0)


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_run_id() -> str:
    """A new 26-character ULID, strictly greater than any earlier id from this process."""
    global _last
    with _lock:
        ms = time.time_ns() // 1_000_000
        last_ms, last_rand = _last
        if ms <= last_ms:
            ms, rand = last_ms, last_rand + 1
            if rand >= 1 << 80:  # astronomically unlikely overflow: move to the next millisecond
                ms, rand = last_ms + 1, int.from_bytes(os.urandom(10), "big") >> 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # leave headroom for increments
        _last = (ms, rand)
    return _encode(ms, 10) + _encode(rand, 16)

