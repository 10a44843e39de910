"""proxy.h2tuning: the HPACK encoder and decoder the HTTP/2 proxy uses, checked
against hpack's own (the reference) on the same inputs."""

from __future__ import annotations

from typing import Any

import hpack
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.h2tuning import CachingDecoder, StatelessEncoder, encode_field

names = st.sampled_from(
    [b":method", b":path", b":status", b"content-type", b"x-request-id", b"x-custom", b"cookie"]
)
values = st.binary(max_size=40).filter(lambda v: b"\x00" not in v) | st.sampled_from(
    [b"GET", b"/", b"200", b"application/grpc", b"gzip, deflate"]
)
fields = st.lists(st.tuples(names, values), max_size=10)


@settings(max_examples=200)
@given(st.lists(fields, min_size=1, max_size=6))
def test_stateless_encoder_round_trips_through_the_reference_decoder(
    blocks: list[list[tuple[bytes, bytes]]],
) -> None:
    encoder, decoder = StatelessEncoder(), hpack.Decoder()
    for block in blocks:
        assert decoder.decode(encoder.encode(block), raw=True) == block
    # Nothing was ever inserted: the peer's table stays empty.
    assert not decoder.header_table.dynamic_entries
    assert not encoder.header_table.dynamic_entries


def test_static_fields_are_one_byte_and_unique_values_are_not_cached() -> None:
    encoder = StatelessEncoder()
    assert encoder.encode([(b":method", b"GET")]) == b"\x82"
    assert encoder.encode([(b":status", b"200")]) == b"\x88"
    first = encoder.encode([(b"x-request-id", b"11111111-aaaa")])
    # A literal without indexing (0x00), raw (no Huffman) for a value seen once.
    assert first[0] == 0x00 and b"11111111-aaaa" in first
    from proxy import h2tuning

    assert (b"x-request-id", b"11111111-aaaa") not in h2tuning._fields


def test_never_indexed_fields_stay_never_indexed() -> None:
    encoder, decoder = StatelessEncoder(), hpack.Decoder()
    # The same fields as plain tuples first, so that their encodings are cached.
    encoder.encode([(b"authorization", b"secret"), HeaderTuple(b"cookie", b"a=b")])
    block = encoder.encode(
        [NeverIndexedHeaderTuple(b"authorization", b"secret"), (b"cookie", b"a=b", True)]
    )
    out = decoder.decode(block, raw=True)
    assert out == [(b"authorization", b"secret"), (b"cookie", b"a=b")]
    assert all(isinstance(h, NeverIndexedHeaderTuple) for h in out)
    assert encode_field(b"authorization", b"secret", never_indexed=True)[0] & 0xF0 == 0x10


def test_a_smaller_table_from_the_peer_is_signalled_first() -> None:
    encoder, decoder = StatelessEncoder(), hpack.Decoder()
    encoder.header_table_size = 0
    block = encoder.encode([(b":method", b"GET")])
    assert block == b"\x20\x82"
    assert decoder.decode(block, raw=True) == [(b":method", b"GET")]
    assert decoder.header_table_size == 0
    assert encoder.encode([(b":method", b"GET")]) == b"\x82"


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.lists(st.tuples(names, st.sampled_from([b"a", b"b", b"c", b"1024"])), max_size=6),
            st.sampled_from([None, 0, 64, 4096]),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_caching_decoder_agrees_with_the_reference_on_indexing_peers(
    blocks: list[tuple[list[tuple[bytes, bytes]], int | None]],
) -> None:
    """A peer that indexes (and resizes its table) changes the decoder's table
    between blocks; the cache must never answer from a stale table."""
    peer = hpack.Encoder()
    ours, reference = CachingDecoder(), hpack.Decoder()
    for block, resize in blocks:
        if resize is not None:
            peer.header_table_size = resize
        for _ in range(2):  # the same block twice: the second may come from the cache
            data = peer.encode(block)
            assert ours.decode(data, raw=True) == reference.decode(data, raw=True) == block
    assert list(ours.header_table.dynamic_entries) == list(reference.header_table.dynamic_entries)


def test_caching_decoder_answers_a_repeated_block_from_its_cache() -> None:
    peer = hpack.Encoder()
    decoder = CachingDecoder()
    block = [(b":status", b"200"), (b"server", b"x"), (b"content-length", b"5")]
    decoder.decode(peer.encode(block), raw=True)  # indexes: the table changes
    data = peer.encode(block)  # all indexed now: decoding it changes nothing
    first = decoder.decode(data, raw=True)
    assert data in decoder._blocks
    again = decoder.decode(data, raw=True)
    assert again == first == block and again is not first
    again.append((b"x", b"y"))  # callers own what they get
    assert decoder.decode(data, raw=True) == block
    assert all(isinstance(h, HeaderTuple) for h in decoder.decode(data, raw=True))


def test_caching_decoder_keeps_the_header_list_limit() -> None:
    peer = hpack.Encoder()
    decoder = CachingDecoder()
    decoder.decode(peer.encode([(b"x-big", b"v" * 100)]), raw=True)
    data = peer.encode([(b"x-big", b"v" * 100)])
    decoder.decode(data, raw=True)
    assert data in decoder._blocks
    decoder.max_header_list_size = 64
    with pytest.raises(hpack.OversizedHeaderListError):
        decoder.decode(data, raw=True)


def test_h2_still_takes_text_headers_and_its_state_machines_still_run() -> None:
    """The patched utf8_encode_headers falls back to h2's own for str (or 3-tuple)
    fields, and h2's transition tables work with the identity enum hashes."""
    import h2.stream

    from proxy.h2conn import new_connection

    fields: list[Any] = [(":method", "GET"), (b":path", b"/"), (b"x", b"y", True)]
    assert h2.stream.utf8_encode_headers(fields) == [
        (b":method", b"GET"),
        (b":path", b"/"),
        (b"x", b"y"),
    ]
    client = new_connection(client_side=True, max_header_list_size=1 << 16)
    server = new_connection(client_side=False, max_header_list_size=1 << 16)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":path", "/")], True)
    events: list[Any] = server.receive_data(client.data_to_send())
    assert events[-2].headers == [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
    assert client.config.client_side is True and server.config.client_side is False
    assert server.config.validate_inbound_headers is False


def test_frames_still_refuse_flags_they_do_not_define() -> None:
    from hyperframe.frame import DataFrame, HeadersFrame

    headers, data = HeadersFrame(1), DataFrame(1)
    headers.flags.add("END_HEADERS")
    data.flags.add("END_STREAM")
    assert "END_HEADERS" in headers.flags and "END_HEADERS" not in data.flags
    with pytest.raises(ValueError, match="Unexpected flag"):
        data.flags.add("END_HEADERS")
    assert DataFrame(3).flags == set()  # no flag leaks from one frame to the next


def _pair() -> tuple[Any, Any]:
    from proxy.h2conn import new_connection

    client = new_connection(client_side=True, max_header_list_size=1 << 16)
    server = new_connection(client_side=False, max_header_list_size=1 << 16)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]


def test_stream_limit_still_enforced_and_closed_streams_still_dropped() -> None:
    """GracefulH2Connection walks h2's stream table less often; the limit a peer
    may open (MAX_CONCURRENT_STREAMS) holds, and finished streams are let go."""
    import h2.exceptions

    from proxy.h2conn import MAX_CONCURRENT_STREAMS

    client, server = _pair()
    for _ in range(200):  # one after the other, each answered in full
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQUEST, end_stream=True)
        server.receive_data(client.data_to_send())
        server.send_headers(sid, [(b":status", b"204")], end_stream=True)
        client.receive_data(server.data_to_send())
    assert len(server.streams) <= 20 and len(client.streams) <= 20

    client, server = _pair()
    client.remote_settings.max_concurrent_streams = 10 * MAX_CONCURRENT_STREAMS  # a rude client
    client.remote_settings.acknowledge()
    for _ in range(MAX_CONCURRENT_STREAMS):
        client.send_headers(client.get_next_available_stream_id(), REQUEST)
    server.receive_data(client.data_to_send())
    assert len(server.streams) == MAX_CONCURRENT_STREAMS
    client.send_headers(client.get_next_available_stream_id(), REQUEST)
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        server.receive_data(client.data_to_send())


def test_h2_connections_that_validate_still_do() -> None:
    """The validation flags are skipped only where every check is off."""
    import h2.config
    import h2.connection
    import h2.exceptions

    from proxy.h2conn import new_connection

    client = new_connection(client_side=True, max_header_list_size=1 << 16)
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    # No :path: h2 needs the flags to know that this block is a request's.
    client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http")], end_stream=True)
    with pytest.raises(h2.exceptions.ProtocolError, match="path"):
        server.receive_data(client.data_to_send())


def test_a_long_lived_connection_remembers_a_bounded_number_of_closed_streams() -> None:
    """h2 would remember 2**16 closed streams per connection (~5 MB on an upstream
    connection that carries every request to its address)."""
    from proxy.h2conn import GracefulH2Connection

    client, server = _pair()
    limit = GracefulH2Connection.MAX_CLOSED_STREAMS
    for _ in range(limit + 100):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQUEST, end_stream=True)
        server.receive_data(client.data_to_send())
        server.send_headers(sid, [(b":status", b"204")], end_stream=True)
        client.receive_data(server.data_to_send())
    assert limit < 2**16
    assert len(client._closed_streams) <= limit and len(server._closed_streams) <= limit


def test_the_speed_ups_are_installed_with_the_h2_this_was_tested_with() -> None:
    """Each patch is skipped when h2/hyperframe no longer have the internals it
    relies on (slower but correct); this says so when a new release does that."""
    import h2.stream
    import hyperframe.flags

    from proxy import h2conn, h2tuning

    assert h2conn._OWN_RECEIVE_FRAME and h2conn._OWN_PREPARE_FOR_SENDING
    assert hyperframe.flags.Flags.__init__ is h2tuning._flags_init
    assert h2.stream.utf8_encode_headers is h2tuning.utf8_encode_headers
    assert h2.stream.H2Stream._build_hdr_validation_flags is h2tuning._hdr_validation_flags
    assert h2.stream.StreamInputs.__hash__ is object.__hash__
