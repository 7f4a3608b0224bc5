"""Frame the single host<->guest byte stream (stdlib only, shared by both sides).

A frame is a 5-byte header -- body length (uint32, big endian) and a channel
number (uint8) -- followed by the body. Jupyter messages travel as their ZMQ
multipart frames packed with :func:`pack_parts`; the agent channel carries one
JSON object per frame.
"""

from __future__ import annotations

import enum
import json
import struct

#: Bumped whenever the frame layout or the agent's ops change incompatibly.
#: Host and guest exchange it in ``hello`` and refuse to talk across versions.
PROTOCOL_VERSION = 1

#: The virtio-serial port the agent listens on (QEMU's ``virtserialport name=``).
SERIAL_PORT_NAME = "org.smolvm.agent.0"
#: The agent's AF_VSOCK port (Firecracker's hybrid vsock, QEMU vhost-vsock).
VSOCK_PORT = 1024
#: Written by the agent (with the hello's nonce) right before its hello reply,
#: so the host can skip any stale bytes a previous connection left behind.
SYNC_MAGIC = b"\x00\xffSMOLVM-SYNC\xff\x00"

HEADER = struct.Struct("!IB")
#: Hard cap on one frame body. Anything larger is a protocol violation: the
#: agent refuses to send it (it reports a drop instead) and the host closes a
#: channel that announces one.
MAX_FRAME = 32 * 1024 * 1024
#: A Jupyter message has 7 frames plus buffers; ipywidgets rarely sends more
#: than a handful of buffers.
MAX_PARTS = 64
_PART_COUNT = struct.Struct("!H")
_PART_LEN = struct.Struct("!I")


class Channel(enum.IntEnum):
    """Which stream a frame belongs to."""

    AGENT = 0
    SHELL = 1
    CONTROL = 2
    STDIN = 3
    IOPUB = 4


#: Frames on these channels jump the queue so an output flood never delays
#: an interrupt, a stats request or a shutdown.
PRIORITY_CHANNELS = frozenset({Channel.AGENT, Channel.CONTROL})


class FrameError(ValueError):
    """The peer sent bytes that are not a valid frame."""


def encode_frame(channel: int, body: bytes) -> bytes:
    """Return header + body for one frame, refusing oversized bodies."""
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame body of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(body), int(channel)) + body


class FrameDecoder:
    """Incrementally split a byte stream into ``(Channel, body)`` frames.

    Validates every header before buffering its body, so a hostile length
    never makes us allocate more than ``max_frame`` bytes.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[Channel, bytes]]:
        self._buf += data
        frames: list[tuple[Channel, bytes]] = []
        while len(self._buf) >= HEADER.size:
            length, chan = HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                raise FrameError(f"frame announces {length} bytes, over the {self.max_frame}-byte limit")
            try:
                channel = Channel(chan)
            except ValueError:
                raise FrameError(f"unknown channel number {chan}") from None
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append((channel, bytes(self._buf[HEADER.size:end])))
            del self._buf[:end]
        return frames

    def reset(self) -> None:
        """Forget a partial frame (the peer reconnected)."""
        self._buf.clear()

    @property
    def pending(self) -> int:
        return len(self._buf)


def pack_parts(parts: list[bytes]) -> bytes:
    """Pack ZMQ multipart frames into one frame body."""
    if len(parts) > MAX_PARTS:
        raise FrameError(f"{len(parts)} message parts exceed the limit of {MAX_PARTS}")
    out = [_PART_COUNT.pack(len(parts))]
    for part in parts:
        out.append(_PART_LEN.pack(len(part)))
        out.append(bytes(part))
    return b"".join(out)


def unpack_parts(body: bytes) -> list[bytes]:
    """Inverse of :func:`pack_parts`; raises :class:`FrameError` on any inconsistency."""
    if len(body) < _PART_COUNT.size:
        raise FrameError("multipart body shorter than its count")
    (count,) = _PART_COUNT.unpack_from(body)
    if count > MAX_PARTS:
        raise FrameError(f"{count} message parts exceed the limit of {MAX_PARTS}")
    pos = _PART_COUNT.size
    parts = []
    for _ in range(count):
        if pos + _PART_LEN.size > len(body):
            raise FrameError("multipart body truncated in a length field")
        (n,) = _PART_LEN.unpack_from(body, pos)
        pos += _PART_LEN.size
        if pos + n > len(body):
            raise FrameError("multipart body truncated in a part")
        parts.append(body[pos:pos + n])
        pos += n
    if pos != len(body):
        raise FrameError(f"{len(body) - pos} trailing bytes after the last part")
    return parts


def encode_json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(body: bytes) -> dict:
    """Parse an agent-channel body; it must be a JSON object."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"agent frame is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError("agent frame is not a JSON object")
    return obj
