"""Speed-ups for the pure-Python HPACK library that h2 uses.

Applied on import:

- hpack logs every header it encodes or decodes at DEBUG; even disabled, those
  calls cost several microseconds per request. Its module loggers are replaced
  by a no-op.
- hpack's Huffman decoder walks a state table per nibble. Peers that send
  header values as literals without indexing (nginx does, for every response)
  pay that on every request for the same few values, so short decoded values
  are memoized in a bounded table.

Used by `proxy.h2conn.new_connection` for every connection:

- `StatelessEncoder` never inserts into the HPACK dynamic table, like the
  encoders of nginx and HAProxy: a field is a static-table index or a literal
  without indexing. Its encoding then depends on the field alone, so it is
  computed once per distinct field for the whole process (bounded) instead of
  on every request with a linear search of the dynamic table. Values that are
  new on every request (request ids, trace context) bypass that cache.
- `CachingDecoder` remembers the fields of recent header blocks by their
  bytes for as long as its dynamic table does not change. Decoding is a
  function of the block and the table, so an identical block (the same
  request again, or nginx's response within the same second) gives the same
  fields without being parsed again.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.stream
import hpack.hpack
import hpack.table
import hyperframe.flags
from hpack import Decoder, Encoder, HeaderTuple
from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from proxy.telemetry.telemetry import TRACE_HEADER_NAMES

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


# -- encoding ------------------------------------------------------------------

_STATIC = HeaderTable.STATIC_TABLE_MAPPING
_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
# Fields whose value is new on every request: caching them would only evict the rest.
UNIQUE_VALUES = TRACE_HEADER_NAMES | {b"x-request-id", b"x-client-trace-id"}
_MAX_FIELD_LEN = 256
_fields: dict[tuple[bytes, bytes], bytes] = {}


def _string(data: bytes, huffman: bool) -> bytes:
    """An HPACK string literal (RFC 7541 5.2), Huffman-coded when asked and shorter."""
    if huffman:
        coded = _huffman.encode(data)
        if len(coded) < len(data):
            length = encode_integer(len(coded), 7)
            length[0] |= 0x80
            return bytes(length) + coded
    return bytes(encode_integer(len(data), 7)) + data


def encode_field(
    name: bytes, value: bytes, *, never_indexed: bool = False, huffman: bool = True
) -> bytes:
    """One field without touching the dynamic table (RFC 7541 6.1, 6.2.2, 6.2.3)."""
    static = _STATIC.get(name)
    if static is not None and not never_indexed:
        index = static[1].get(value)
        if index is not None:
            field = encode_integer(index, 7)
            field[0] |= 0x80
            return bytes(field)
    flag = 0x10 if never_indexed else 0x00
    if static is not None:
        prefix = encode_integer(static[0], 4)
        prefix[0] |= flag
        return bytes(prefix) + _string(value, huffman)
    return bytes((flag,)) + _string(name, huffman) + _string(value, huffman)


def _cached_field(name: bytes, value: bytes) -> bytes:
    encoded = encode_field(name, value)
    if len(name) + len(value) <= _MAX_FIELD_LEN:
        if len(_fields) >= _MAX_ENTRIES:
            _fields.clear()
        _fields[(name, value)] = encoded
    return encoded


class StatelessEncoder(Encoder):
    """An hpack Encoder that never adds to its dynamic table (see the module doc).

    Table size updates the peer's SETTINGS cause are still signalled at the
    start of the next block, as RFC 7541 4.2 asks.
    """

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        if type(headers) is dict:
            return super().encode(headers, huffman)
        block: list[bytes] = []
        table = self.header_table
        if table.resized:
            block.append(self._encode_table_size_change())
            table.resized = False
        fields = _fields
        for header in headers:
            kind = type(header)
            # (A NeverIndexedHeaderTuple equals its plain tuple: not looked up.)
            if kind is tuple or kind is HeaderTuple:
                encoded = fields.get(header)
                if encoded is not None:
                    block.append(encoded)
                    continue
            name, value = header[0], header[1]
            if type(name) is not bytes:
                name = name.encode()
            if type(value) is not bytes:
                value = value.encode()
            if isinstance(header, HeaderTuple) and not header.indexable:
                # RFC 7541 7.1.3: a never-indexed field stays so on every hop.
                block.append(encode_field(name, value, never_indexed=True, huffman=huffman))
            elif len(header) > 2 and header[2]:  # (name, value, sensitive)
                block.append(encode_field(name, value, never_indexed=True, huffman=huffman))
            elif name in UNIQUE_VALUES or not huffman:
                block.append(encode_field(name, value, huffman=False))
            else:
                block.append(_cached_field(name, value))
        return b"".join(block)


# -- decoding ------------------------------------------------------------------


class _VersionedTable(HeaderTable):
    """A header table that counts its changes, so a decoder knows when its cache is stale."""

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    def add(self, name: bytes, value: bytes) -> None:
        if not self.dynamic_entries and 32 + len(name) + len(value) > self._maxsize:
            # Too big for an empty table: nothing changes. (nginx indexes every
            # response field after shrinking our table to 0: a no-op each time.)
            return
        self.version += 1
        super().add(name, value)

    @property  # type: ignore[override]
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        if int(newmax) != self._maxsize:
            self.version += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


_MAX_BLOCK_LEN = 1024  # header blocks longer than this are not remembered
_MAX_BLOCK_FIELDS = 8192  # nor those that decode to more than this (RFC 7541 4.1 sizes)
_MAX_BLOCKS = 32  # per connection


class CachingDecoder(Decoder):
    """An hpack Decoder that remembers recent blocks while its table is unchanged."""

    def __init__(self, max_header_list_size: int = 64 * 1024) -> None:
        super().__init__(max_header_list_size)
        self.header_table: _VersionedTable = _VersionedTable()
        self._blocks: dict[bytes, tuple[list[Any], int]] = {}
        self._version = 0

    def decode(self, data: bytes, raw: bool = False) -> Any:
        if not raw or type(data) is not bytes:
            return super().decode(data, raw)
        table = self.header_table
        blocks = self._blocks
        if table.version != self._version:
            blocks.clear()
            self._version = table.version
        else:
            hit = blocks.get(data)
            if hit is not None and hit[1] <= self.max_header_list_size:
                self._assert_valid_table_size()
                return list(hit[0])
        headers: list[Any] = super().decode(data, raw=True)  # type: ignore[assignment]
        if (
            table.version == self._version
            and 0 < len(data) <= _MAX_BLOCK_LEN
            # A block that resizes the table is checked against our limit every time.
            and data[0] & 0xE0 != 0x20
        ):
            size = sum(32 + len(n) + len(v) for n, v in headers)
            if size <= _MAX_BLOCK_FIELDS:
                if len(blocks) >= _MAX_BLOCKS:
                    blocks.clear()
                blocks[data] = (list(headers), size)
        return headers


# -- h2 --------------------------------------------------------------------------

_utf8_encode_headers = getattr(h2.stream, "utf8_encode_headers", None)


def utf8_encode_headers(headers: Any) -> Any:
    """h2's, without rebuilding every field when all names and values are bytes
    already (the proxy's always are): h2 calls it for every block it sends."""
    out = list(headers)
    for header in out:
        if type(header[0]) is not bytes or type(header[1]) is not bytes or len(header) != 2:
            assert _utf8_encode_headers is not None  # only installed when h2 has one
            return _utf8_encode_headers(out)
    return out


_build_hdr_validation_flags = getattr(h2.stream.H2Stream, "_build_hdr_validation_flags", None)


def _hdr_validation_flags(self: h2.stream.H2Stream, events: Any) -> Any:
    """h2 builds these flags for every header block sent or received, and only
    reads them to validate or normalize; not built when all four are off."""
    config = self.config
    if (
        config.validate_inbound_headers
        or config.normalize_inbound_headers
        or config.validate_outbound_headers
        or config.normalize_outbound_headers
    ):
        assert _build_hdr_validation_flags is not None  # only installed when h2 has it
        return _build_hdr_validation_flags(self, events)
    return None


class PlainConfig(h2.config.H2Configuration):
    """An H2Configuration whose options are plain attributes.

    The base class validates each option through a descriptor, and h2 reads
    them several times per frame, each read a Python call. Plain class
    attributes here shadow those descriptors, so the values set by the base
    __init__ land in the instance dict; pass them as literals of the right type.
    """

    client_side = True
    header_encoding = None
    validate_outbound_headers = True
    normalize_outbound_headers = True
    split_outbound_cookies = False
    validate_inbound_headers = True
    normalize_inbound_headers = True


def _fast_enum_hashes() -> None:
    """h2's state machines look up (state, input) pairs in dicts several times
    per frame, and a plain Enum hashes through a Python-level __hash__. Enum
    members compare by identity, so identity hashing (C-level) is equivalent;
    the transition tables are rebuilt with the new hashes."""
    for cls in (
        h2.stream.StreamInputs,
        h2.connection.ConnectionState,
        h2.connection.ConnectionInputs,
    ):
        if cls.__hash__ is not object.__hash__:
            cls.__hash__ = object.__hash__  # type: ignore[assignment,method-assign]
    # (A comprehension, not dict(): copying a dict keeps the old hashes.)
    h2.stream._transitions = {k: v for k, v in h2.stream._transitions.items()}
    machine = h2.connection.H2ConnectionStateMachine
    machine._transitions = {k: v for k, v in machine._transitions.items()}


# Valid flag names per frame class (its defined_flags list, which lives as long
# as the class): hyperframe builds that set anew for every frame.
_flag_names: dict[int, tuple[object, frozenset[str]]] = {}


def _flags_init(self: hyperframe.flags.Flags, defined_flags: Any) -> None:
    entry = _flag_names.get(id(defined_flags))
    if entry is None or entry[0] is not defined_flags:
        names = frozenset(flag.name for flag in defined_flags)
        if type(defined_flags) not in (list, tuple):  # not known to be re-iterable
            self._valid_flags = set(names)
            self._flags = set()
            return
        entry = _flag_names[id(defined_flags)] = (defined_flags, names)
    self._valid_flags = entry[1]  # type: ignore[assignment]
    self._flags = set()


def apply() -> None:
    """Install what the installed h2/hyperframe versions have the internals for
    (tested with h2 4.4, hyperframe 6.1, hpack 4.2); anything else is skipped,
    slower but correct."""
    if {"_valid_flags", "_flags"} <= set(hyperframe.flags.Flags.__init__.__code__.co_names):
        hyperframe.flags.Flags.__init__ = _flags_init  # type: ignore[method-assign]
    if hasattr(h2.stream, "_transitions") and hasattr(
        h2.connection.H2ConnectionStateMachine, "_transitions"
    ):
        _fast_enum_hashes()
    if _utf8_encode_headers is not None:
        h2.stream.utf8_encode_headers = utf8_encode_headers  # type: ignore[assignment]
    if _build_hdr_validation_flags is not None:
        h2.stream.H2Stream._build_hdr_validation_flags = _hdr_validation_flags  # type: ignore[method-assign]
    hpack.hpack.decode_huffman = cached_decode_huffman
    hpack.hpack.log = _NoLog()  # type: ignore[assignment]
    hpack.table.log = _NoLog()  # type: ignore[assignment]


apply()
