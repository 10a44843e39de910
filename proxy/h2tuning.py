"""Speed-ups for the pure-Python HPACK library that h2 uses (applied on import).

- hpack logs every header it encodes or decodes at DEBUG; even disabled, those
  calls cost several microseconds per request. Its module loggers are replaced
  by a no-op.
- hpack's Huffman decoder walks a state table per nibble. Peers that send
  header values as literals without indexing (nginx does, for every response)
  pay that on every request for the same few values, so short decoded values
  are memoized in a bounded table.
"""

from __future__ import annotations

import hpack.hpack
import hpack.table
from hpack.huffman_table import decode_huffman

_MAX_CACHED_LEN = 128
_MAX_ENTRIES = 4096
_cache: dict[bytes, bytes] = {}


def cached_decode_huffman(huffman_string: bytes | bytearray | memoryview | None) -> bytes:
    """hpack's decode_huffman, memoized for short inputs (bounded memory)."""
    data = huffman_string
    if type(data) is not bytes:
        return decode_huffman(data)
    try:
        return _cache[data]
    except KeyError:
        pass
    decoded = decode_huffman(data)
    if len(data) <= _MAX_CACHED_LEN:
        if len(_cache) >= _MAX_ENTRIES:
            _cache.clear()
        _cache[data] = decoded
    return decoded


class _NoLog:
    def debug(self, *args: object, **kwargs: object) -> None:
        pass


def apply() -> None:
    hpack.hpack.decode_huffman = cached_decode_huffman
    hpack.hpack.log = _NoLog()  # type: ignore[assignment]
    hpack.table.log = _NoLog()  # type: ignore[assignment]


apply()
