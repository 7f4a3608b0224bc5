"""Jupyter messages on the wire: build, sign, verify (messaging protocol 5.3).

The kernel process answers the frontend's first ``kernel_info_request``
while its microVM is still being restored, so what it imports before that
answer is on every launch's critical path. ``jupyter_client.session`` pulls
in the whole client package (~50 ms here); the part of it a kernel needs is
this: the frame layout, HMAC signatures, replay protection.

    session = Session(key=b"...")
    frames = session.serialize(session.msg("status", {"execution_state": "idle"}), ident=[b"topic"])
    idents, msg_list = session.feed_identities(frames)
    msg = session.deserialize(msg_list)
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import hmac
import json
import math
import uuid

DELIM = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"
#: Signatures remembered to refuse a replayed message (as jupyter_client does).
_DIGEST_HISTORY = 1 << 16


def sign(key: bytes, digestmod, parts: list[bytes]) -> bytes:
    """The hex HMAC of ``parts`` (header, parent, metadata, content); b"" without a key."""
    if not key:
        return b""
    h = hmac.new(key, digestmod=digestmod)
    for p in parts:
        h.update(p)
    return h.hexdigest().encode()


def pack(obj) -> bytes:
    """JSON as the protocol wants it: UTF-8, no NaN (replaced by null)."""
    try:
        text = json.dumps(obj, default=_json_default, ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(obj), default=_json_default, ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8", errors="surrogateescape")


def _json_default(obj):
    if isinstance(obj, datetime.datetime):
        return _iso(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", errors="replace")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _iso(when: datetime.datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


class Session:
    """One side's identity and key for signed Jupyter messages."""

    def __init__(self, key: bytes | str = b"", signature_scheme: str = "hmac-sha256",
                 username: str = "smolvm") -> None:
        prefix, _, digest = signature_scheme.partition("-")
        if prefix != "hmac" or digest not in hashlib.algorithms_available:
            raise ValueError(f"unsupported signature_scheme {signature_scheme!r}; use hmac-<a hashlib "
                             f"algorithm>, such as hmac-sha256")
        self.key = key.encode() if isinstance(key, str) else bytes(key)
        self.signature_scheme = signature_scheme
        self.digestmod = digest
        self.username = username
        self.session = str(uuid.uuid4())
        self._seen: set[bytes] = set()
        self._seen_order: collections.deque[bytes] = collections.deque()

    def msg(self, msg_type: str, content: dict | None = None, parent: dict | None = None,
            metadata: dict | None = None) -> dict:
        """A new message; ``parent`` is the request it answers (its header, or the whole message)."""
        header = {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": self.username,
                  "session": self.session, "date": _iso(datetime.datetime.now(datetime.timezone.utc)),
                  "version": PROTOCOL_VERSION}
        if parent and "header" in parent:
            parent = parent["header"]
        return {"header": header, "msg_id": header["msg_id"], "msg_type": msg_type,
                "parent_header": dict(parent or {}), "content": content if content is not None else {},
                "metadata": metadata or {}}

    def sign(self, parts: list[bytes]) -> bytes:
        return sign(self.key, self.digestmod, parts)

    def serialize(self, msg: dict, ident: bytes | list[bytes] | None = None) -> list[bytes]:
        """Frames ready for a ZMQ socket: identities, delimiter, signature, four JSON parts, buffers."""
        content = msg.get("content", {})
        body = [pack(msg["header"]), pack(msg.get("parent_header") or {}), pack(msg.get("metadata") or {}),
                content if isinstance(content, bytes) else pack(content)]
        idents = [] if ident is None else ([ident] if isinstance(ident, bytes) else list(ident))
        return [*idents, DELIM, self.sign(body), *body, *(bytes(b) for b in msg.get("buffers") or ())]

    @staticmethod
    def feed_identities(frames: list, copy: bool = True) -> tuple[list[bytes], list[bytes]]:
        """Split routing identities from the message proper (signature first)."""
        frames = [bytes(f.bytes if hasattr(f, "bytes") else f) for f in frames]
        try:
            i = frames.index(DELIM)
        except ValueError:
            raise ValueError("no <IDS|MSG> delimiter in the message") from None
        return frames[:i], frames[i + 1:]

    def deserialize(self, msg_list: list[bytes], content: bool = True, copy: bool = True) -> dict:
        """Verify and unpack ``msg_list`` (from :meth:`feed_identities`); ValueError if it is not
        well-formed, unsigned, wrongly signed or a replay."""
        if len(msg_list) < 5:
            raise ValueError(f"a message needs at least 5 frames after the delimiter, got {len(msg_list)}")
        signature, body = msg_list[0], msg_list[1:5]
        if self.key:
            if not signature:
                raise ValueError("unsigned message")
            if signature in self._seen:
                raise ValueError(f"duplicate signature {signature[:16]!r}...: a replayed message")
            if not hmac.compare_digest(signature, self.sign(body)):
                raise ValueError("invalid signature")
            self._remember(signature)
        header = _json_dict(body[0], "header")
        msg = {"header": header, "msg_id": header.get("msg_id"), "msg_type": header.get("msg_type"),
               "parent_header": _json_dict(body[1], "parent_header"),
               "metadata": _json_dict(body[2], "metadata"),
               "content": _json_dict(body[3], "content") if content else body[3],
               "buffers": list(msg_list[5:])}
        return msg

    def _remember(self, signature: bytes) -> None:
        self._seen.add(signature)
        self._seen_order.append(signature)
        if len(self._seen_order) > _DIGEST_HISTORY:
            self._seen.discard(self._seen_order.popleft())


def _json_dict(data: bytes, part: str) -> dict:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"the message's {part} is not a JSON object")
    return value
