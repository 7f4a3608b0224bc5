"""The frame format shared by host and guest."""

from __future__ import annotations

import pytest

from smolvm_guest import wire
from smolvm_guest.wire import Channel, FrameDecoder, FrameError


def test_round_trip_in_arbitrary_chunks():
    frames = [(Channel.SHELL, b"a" * 10), (Channel.AGENT, b"{}"), (Channel.IOPUB, b""),
              (Channel.STDIN, bytes(range(256)) * 100)]
    stream = b"".join(wire.encode_frame(c, b) for c, b in frames)
    for step in (1, 3, 7, 4096, len(stream)):
        dec = FrameDecoder()
        got = []
        for i in range(0, len(stream), step):
            got += dec.feed(stream[i:i + step])
        assert got == frames
        assert dec.pending == 0


def test_oversized_frame_is_refused_before_buffering():
    dec = FrameDecoder(max_frame=1024)
    header = wire.HEADER.pack(1025, Channel.IOPUB)
    with pytest.raises(FrameError, match="1025 bytes"):
        dec.feed(header)
    with pytest.raises(FrameError):
        wire.encode_frame(Channel.SHELL, b"x" * (wire.MAX_FRAME + 1))


def test_hostile_length_does_not_allocate():
    dec = FrameDecoder()
    with pytest.raises(FrameError):
        dec.feed(wire.HEADER.pack(0xFFFFFFFF, Channel.SHELL))


def test_unknown_channel_is_an_error():
    with pytest.raises(FrameError, match="unknown channel"):
        FrameDecoder().feed(wire.HEADER.pack(0, 99))


def test_multipart_round_trip_and_limits():
    parts = [b"<IDS|MSG>", b"sig", b"{}", b"", b"x" * 1000]
    assert wire.unpack_parts(wire.pack_parts(parts)) == parts
    with pytest.raises(FrameError):
        wire.pack_parts([b""] * (wire.MAX_PARTS + 1))


@pytest.mark.parametrize("body", [
    b"",                                   # shorter than the count
    b"\x00\x02\x00\x00\x00\x01a",          # second part missing
    b"\x00\x01\x00\x00\x00\x05ab",         # part truncated
    b"\x00\x01\x00\x00\x00\x01ab",         # trailing bytes
    b"\xff\xff",                           # too many parts
    b"\x00\x01\x00\x00",                   # truncated length field
])
def test_malformed_multipart_bodies(body):
    with pytest.raises(FrameError):
        wire.unpack_parts(body)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"\xff\xfe", b'"s"'])
def test_agent_bodies_must_be_json_objects(body):
    with pytest.raises(FrameError):
        wire.decode_json(body)


def test_priority_channels():
    assert Channel.CONTROL in wire.PRIORITY_CHANNELS
    assert Channel.AGENT in wire.PRIORITY_CHANNELS
    assert Channel.IOPUB not in wire.PRIORITY_CHANNELS


def test_host_and_guest_agree_on_the_protocol():
    """The host's channel and the guest agent both use the one definition."""
    import smolvm_guest.agent as agent
    from smolvm_kernel.channel import stream

    assert agent.wire is wire
    assert stream.wire is wire
    import smolvm_guest.link as link

    assert agent.SYNC_MAGIC is wire.SYNC_MAGIC      # defined once, in the wire module
    assert link.SERIAL_PORT_NAME is wire.SERIAL_PORT_NAME and link.VSOCK_PORT is wire.VSOCK_PORT
    assert stream.SYNC_MAGIC is wire.SYNC_MAGIC
    assert isinstance(wire.PROTOCOL_VERSION, int) and wire.PROTOCOL_VERSION >= 1
