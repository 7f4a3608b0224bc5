"""The kernel's own Jupyter message signing agrees with jupyter_client's, both ways."""

from __future__ import annotations

import json

import pytest
from jupyter_client.session import Session as ClientSession

from smolvm_kernel.vm.session import DELIM, Session

KEY = b"k" * 32


@pytest.mark.parametrize("scheme", ["hmac-sha256", "hmac-sha512", "hmac-md5"])
def test_jupyter_client_reads_ours(scheme):
    ours = Session(key=KEY, signature_scheme=scheme, username="host")
    parent = ClientSession(key=KEY, signature_scheme=scheme).msg("execute_request", {"code": "1"})
    msg = ours.msg("execute_result", {"data": {"text/plain": "1"}, "execution_count": 1}, parent,
                   metadata={"m": 1})
    frames = ours.serialize(msg, ident=[b"a", b"b"])
    client = ClientSession(key=KEY, signature_scheme=scheme, check_pid=False)
    idents, msg_list = client.feed_identities(frames)
    got = client.deserialize(msg_list)
    assert idents == [b"a", b"b"]
    assert got["msg_type"] == "execute_result" and got["content"]["execution_count"] == 1
    assert got["parent_header"]["msg_id"] == parent["header"]["msg_id"]
    assert got["metadata"] == {"m": 1} and got["header"]["version"] == "5.3"


def test_we_read_jupyter_clients_and_refuse_forgeries():
    client = ClientSession(key=KEY, check_pid=False)
    frames = client.serialize(client.msg("kernel_info_request", {}), ident=b"peer")
    ours = Session(key=KEY)
    idents, msg_list = ours.feed_identities(frames)
    assert idents == [b"peer"]
    assert ours.deserialize(msg_list)["msg_type"] == "kernel_info_request"
    with pytest.raises(ValueError, match="replayed"):
        ours.deserialize(msg_list)
    forged = client.serialize(client.msg("execute_request", {"code": "x"}))
    i = forged.index(DELIM)
    forged[i + 5] = json.dumps({"code": "import os"}).encode()
    with pytest.raises(ValueError, match="invalid signature"):
        Session(key=KEY).deserialize(forged[i + 1:])
    with pytest.raises(ValueError, match="unsigned"):
        Session(key=KEY).deserialize([b"", *forged[i + 2:]])
    with pytest.raises(ValueError, match="delimiter"):
        ours.feed_identities([b"no", b"delimiter"])
    with pytest.raises(ValueError, match="5 frames"):
        ours.deserialize([b"sig", b"{}"])


def test_unkeyed_session_does_not_sign_and_nan_becomes_null():
    ours = Session(key=b"")
    frames = ours.serialize(ours.msg("status", {"x": float("nan"), "y": [float("inf")]}))
    assert frames[1] == b""
    assert json.loads(frames[5]) == {"x": None, "y": [None]}
    with pytest.raises(ValueError, match="signature_scheme"):
        Session(key=KEY, signature_scheme="sha256")
