"""Firecracker backend without Firecracker: payloads vs the API contract kept in the repo, HTTP, vsock handshake."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import jsonschema
import pytest

from smolvm_kernel.backends.base import VMSpec
from smolvm_kernel.backends.firecracker import (FirecrackerBackend, firecracker_available,
                                                parse_vsock_ok, vsock_connect)
from smolvm_kernel.backends.firecracker_api import (FirecrackerAPIError, api_request, boot_requests,
                                                    pause_vm_body, restore_requests, save_snapshot,
                                                    snapshot_create_body, snapshot_load_body)
from smolvm_kernel.errors import ProtocolError, SmolVMError
from smolvm_kernel.images import Image
from smolvm_kernel.vm.snapshot import Snapshot

import smolvm_kernel.backends.firecracker as firecracker_module
import smolvm_kernel.backends.firecracker_api as firecracker_api_module

#: The API contract the backend is written to, kept in the repository.
CONTRACT_PATH = Path(firecracker_api_module.__file__).with_name("firecracker_contract.json")


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def contract() -> dict:
    doc = json.loads(CONTRACT_PATH.read_text())
    jsonschema.Draft4Validator.check_schema({"definitions": doc["definitions"]})
    return doc


@pytest.fixture
def spec(tmp_path: Path) -> VMSpec:
    image_dir = tmp_path / "image"
    image_dir.mkdir()
    image = Image(profile="base", key="0" * 64, directory=image_dir, kernel_release="x")
    for part in (image.vmlinux, image.initramfs, image.rootfs):
        part.write_bytes(b"")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return VMSpec(vm_id="0123456789ab", run_dir=run_dir, image=image, vcpus=2, mem_mib=512,
                  accel="kvm")


def _operation(doc: dict, method: str, path: str) -> tuple[dict, dict[str, str]]:
    """Find the schema operation for a concrete path; return it and the path parameters."""
    for template, ops in doc["paths"].items():
        names = re.findall(r"\{(\w+)\}", template)
        pattern = "^" + re.sub(r"\\\{\w+\\\}", "([^/]+)", re.escape(template)) + "$"
        match = re.match(pattern, path)
        if match and method.lower() in ops:
            return ops[method.lower()], dict(zip(names, match.groups()))
    raise AssertionError(f"{method} {path} is not an operation in the Firecracker API contract")


def _body_ref(operation: dict) -> str:
    return f"#/definitions/{operation['body']}"


def _validator(doc: dict, ref: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator({"$ref": ref, "definitions": doc["definitions"]})


# ------------------------------------------------------------ payloads vs schema

def test_every_boot_request_validates_against_the_schema(contract: dict, spec: VMSpec) -> None:
    requests = boot_requests(spec, spec.run_dir)
    assert requests, "boot_requests returned nothing"
    for method, path, body in requests:
        _assert_valid(contract, method, path, body)
        _, params = _operation(contract, method, path)
        for name, value in params.items():
            # Firecracker answers 400 when the path id and the body id differ.
            assert body.get(name) == value, f"{path}: {name} in the path and the body differ"


def test_boot_requests_follow_firecrackers_boot_order(spec: VMSpec) -> None:
    requests = boot_requests(spec, spec.run_dir)
    paths = [path for _, path, _ in requests]
    assert paths == ["/machine-config", "/boot-source", "/drives/base", "/drives/scratch",
                     "/vsock", "/entropy", "/actions"]
    assert all(method == "PUT" for method, _, _ in requests)
    assert requests[-1][2] == {"action_type": "InstanceStart"}


def test_boot_request_contents(spec: VMSpec) -> None:
    bodies = {path: body for _, path, body in boot_requests(spec, spec.run_dir)}
    assert bodies["/machine-config"]["vcpu_count"] == 2
    assert bodies["/machine-config"]["mem_size_mib"] == 512
    boot = bodies["/boot-source"]
    assert boot["kernel_image_path"] == str(spec.image.vmlinux)
    assert boot["initrd_path"] == str(spec.image.initramfs)
    assert "smolvm.channel=vsock" in boot["boot_args"].split()
    assert boot["boot_args"].startswith(spec.kernel_cmdline())
    base, scratch = bodies["/drives/base"], bodies["/drives/scratch"]
    assert base == {"drive_id": "base", "path_on_host": str(spec.image.rootfs),
                    "is_root_device": False, "is_read_only": True}
    assert scratch == {"drive_id": "scratch", "path_on_host": str(spec.scratch_disk),
                       "is_root_device": False, "is_read_only": False}
    assert bodies["/vsock"] == {"guest_cid": 3, "uds_path": str(spec.run_dir / "vsock.sock")}


@pytest.mark.parametrize("path, body", [
    ("/machine-config", {"vcpu_count": "2", "mem_size_mib": 512}),
    ("/machine-config", {"vcpu_count": 2}),
    ("/boot-source", {"initrd_path": "/x/initramfs.cpio"}),
    ("/drives/base", {"drive_id": "base", "path_on_host": "/x/rootfs.sqfs"}),
    ("/drives/base", {"drive_id": "base", "is_root_device": "no"}),
    ("/vsock", {"guest_cid": 2, "uds_path": "/x/vsock.sock"}),
    ("/actions", {"action_type": "Start"}),
])
def test_wrong_bodies_fail_validation(contract: dict, path: str, body: dict) -> None:
    # Proves the schema check above can fail at all.
    operation, _ = _operation(contract, "PUT", path)
    assert list(_validator(contract, _body_ref(operation)).iter_errors(body)), \
        f"{path} accepted an invalid body {body}"


# ------------------------------------------------------------ snapshots vs schema

def _assert_valid(contract: dict, method: str, path: str, body: dict) -> None:
    """The body validates against its definition and has no key the contract lacks
    (Firecracker rejects unknown keys)."""
    operation, _ = _operation(contract, method, path)
    ref = _body_ref(operation)
    errors = [e.message for e in _validator(contract, ref).iter_errors(body)]
    assert not errors, f"{method} {path} body {body} fails {ref}: {errors}"
    definition = contract["definitions"][ref.rsplit("/", 1)[1]]
    unknown = set(body) - set(definition.get("properties", {}))
    assert not unknown, f"{method} {path}: keys {unknown} are not in {ref}"


def _snapshot(tmp_path: Path) -> Snapshot:
    directory = tmp_path / "snap"
    directory.mkdir(exist_ok=True)
    return Snapshot(key="f" * 64, directory=directory)


def test_snapshot_bodies_validate_against_the_schema(contract: dict, tmp_path: Path) -> None:
    _assert_valid(contract, "PATCH", "/vm", pause_vm_body())
    _assert_valid(contract, "PUT", "/snapshot/create",
                  snapshot_create_body(tmp_path / "state.bin", tmp_path / "memory.bin"))
    _assert_valid(contract, "PUT", "/snapshot/load",
                  snapshot_load_body(tmp_path / "state.bin", tmp_path / "memory.bin"))
    load = snapshot_load_body(tmp_path / "state.bin", tmp_path / "memory.bin",
                              vsock_uds=tmp_path / "vsock.sock")
    _assert_valid(contract, "PUT", "/snapshot/load", load)
    nested = contract["definitions"]
    assert set(load["mem_backend"]) <= set(nested["MemoryBackend"]["properties"])
    assert set(load["vsock_override"]) <= set(nested["VsockOverride"]["properties"])


def test_snapshot_body_contents(tmp_path: Path) -> None:
    assert pause_vm_body() == {"state": "Paused"}
    assert snapshot_create_body(tmp_path / "s", tmp_path / "m") == {
        "snapshot_type": "Full", "snapshot_path": str(tmp_path / "s"),
        "mem_file_path": str(tmp_path / "m")}
    load = snapshot_load_body(tmp_path / "s", tmp_path / "m")
    assert load == {"snapshot_path": str(tmp_path / "s"),
                    "mem_backend": {"backend_type": "File", "backend_path": str(tmp_path / "m")},
                    "resume_vm": True}
    # Exactly one of the two memory forms: the deprecated one is not sent.
    assert "mem_file_path" not in load


def test_load_schema_has_no_drive_override(contract: dict) -> None:
    # Documented limitation (FirecrackerBackend docstring): drive paths come
    # from the snapshot. If a later schema adds an override, revisit it.
    props = set(contract["definitions"]["SnapshotLoadParams"]["properties"])
    assert "vsock_override" in props
    assert not {p for p in props if "drive" in p}


@pytest.mark.parametrize("method, path, body", [
    ("PATCH", "/vm", {"state": "Pause"}),
    ("PATCH", "/vm", {}),
    ("PUT", "/snapshot/create", {"snapshot_path": "/x/state.bin"}),
    ("PUT", "/snapshot/create", {"snapshot_path": "/x/s", "mem_file_path": "/x/m",
                                 "snapshot_type": "Incremental"}),
    ("PUT", "/snapshot/load", {"mem_backend": {"backend_type": "File", "backend_path": "/x/m"}}),
    ("PUT", "/snapshot/load", {"snapshot_path": "/x/s",
                               "mem_backend": {"backend_type": "Mmap", "backend_path": "/x/m"}}),
    ("PUT", "/snapshot/load", {"snapshot_path": "/x/s", "mem_backend": {"backend_type": "File"}}),
    ("PUT", "/snapshot/load", {"snapshot_path": "/x/s", "resume_vm": "yes"}),
    ("PUT", "/snapshot/load", {"snapshot_path": "/x/s", "vsock_override": {}}),
])
def test_wrong_snapshot_bodies_fail_validation(contract: dict, method: str, path: str,
                                               body: dict) -> None:
    operation, _ = _operation(contract, method, path)
    assert list(_validator(contract, _body_ref(operation)).iter_errors(body)), \
        f"{method} {path} accepted an invalid body {body}"


def test_restore_requests_are_a_single_snapshot_load(contract: dict, spec: VMSpec,
                                                     tmp_path: Path) -> None:
    snap = _snapshot(tmp_path)
    requests = restore_requests(snap, spec.run_dir)
    assert [(m, p) for m, p, _ in requests] == [("PUT", "/snapshot/load")]
    body = requests[0][2]
    _assert_valid(contract, "PUT", "/snapshot/load", body)
    assert body == {
        "snapshot_path": str(snap.state),
        "mem_backend": {"backend_type": "File", "backend_path": str(snap.directory / "memory.bin")},
        "resume_vm": True,
        "vsock_override": {"uds_path": str(spec.run_dir / "vsock.sock")},
    }
    # None of the boot sequence: /snapshot/load wants a fresh Firecracker.
    boot_paths = {p for _, p, _ in boot_requests(spec, spec.run_dir)}
    assert not boot_paths & {p for _, p, _ in requests}
    assert all(b.get("action_type") != "InstanceStart" for _, _, b in requests)


def test_backend_accepts_restore_and_drop_privileges(spec: VMSpec, tmp_path: Path) -> None:
    snap = _snapshot(tmp_path)
    backend = FirecrackerBackend(spec, "firecracker", restore=snap, drop_privileges=False)
    assert backend.restore is snap and backend.drop_privileges is False
    plain = FirecrackerBackend(spec, "firecracker")
    assert plain.restore is None and plain.drop_privileges is True


def _launch_against_fake(spec: VMSpec, backend: FirecrackerBackend, monkeypatch,
                         tmp_path: Path) -> list:
    """Run launch() with _spawn serving a fake API socket; return the requests it got."""
    from smolvm_kernel.backends import firecracker as fc

    requests: list = []
    n = 1 if backend.restore is not None else len(boot_requests(spec, spec.run_dir))
    answer = _http_server([b"HTTP/1.1 204 No Content\r\n\r\n"] * n, requests)
    servers = []

    async def handler(reader, writer):
        try:
            await answer(reader, writer)
        except asyncio.IncompleteReadError:
            writer.close()  # launch()'s readiness probe connects and hangs up

    async def fake_spawn(argv, **kwargs):
        servers.append(await asyncio.start_unix_server(handler, path=str(backend.api_sock)))

    monkeypatch.setattr(backend, "_spawn", fake_spawn)
    monkeypatch.setattr(backend, "poll", lambda: None)
    monkeypatch.setattr(fc.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(fc, "create_scratch_disk",
                        lambda path, mib: Path(path).write_bytes(b"fresh"))

    async def main():
        try:
            await backend.launch()
        finally:
            for server in servers:
                server.close()
                await server.wait_closed()

    asyncio.run(main())
    return requests


def test_launch_restore_copies_scratch_and_sends_only_load(spec: VMSpec, tmp_path: Path,
                                                           monkeypatch) -> None:
    snap = _snapshot(tmp_path)
    snap.scratch.write_bytes(b"template scratch")
    backend = FirecrackerBackend(spec, "firecracker", restore=snap)
    requests = _launch_against_fake(spec, backend, monkeypatch, tmp_path)
    assert [line for line, _, _ in requests] == [b"PUT /snapshot/load HTTP/1.1"]
    assert json.loads(requests[0][2]) == restore_requests(snap, spec.run_dir)[0][2]
    assert spec.scratch_disk.read_bytes() == b"template scratch"


def test_launch_boot_sends_the_boot_sequence(spec: VMSpec, tmp_path: Path, monkeypatch) -> None:
    backend = FirecrackerBackend(spec, "firecracker")
    requests = _launch_against_fake(spec, backend, monkeypatch, tmp_path)
    expected = boot_requests(spec, spec.run_dir)
    assert [line for line, _, _ in requests] == \
        [f"{m} {p} HTTP/1.1".encode() for m, p, _ in expected]
    assert [json.loads(body) for _, _, body in requests] == [b for _, _, b in expected]
    assert spec.scratch_disk.read_bytes() == b"fresh"


def test_save_snapshot_pauses_then_creates(tmp_path: Path) -> None:
    responses = [b"HTTP/1.1 204 No Content\r\n\r\n"] * 2
    requests: list = []
    sock = tmp_path / "fc.sock"
    _run_with_server(sock, _http_server(responses, requests),
                     lambda: save_snapshot(sock, tmp_path / "state.bin", tmp_path / "memory.bin"))
    assert [line for line, _, _ in requests] == [b"PATCH /vm HTTP/1.1",
                                                 b"PUT /snapshot/create HTTP/1.1"]
    assert json.loads(requests[0][2]) == {"state": "Paused"}
    assert json.loads(requests[1][2]) == {"snapshot_type": "Full",
                                          "snapshot_path": str(tmp_path / "state.bin"),
                                          "mem_file_path": str(tmp_path / "memory.bin")}


def test_save_snapshot_stops_when_pause_is_refused(tmp_path: Path) -> None:
    fault = b'{"fault_message":"The VM is not running."}'
    responses = [b"HTTP/1.1 400 Bad Request\r\nContent-Length: " + str(len(fault)).encode()
                 + b"\r\n\r\n" + fault]
    requests: list = []
    sock = tmp_path / "fc.sock"

    async def client():
        with pytest.raises(FirecrackerAPIError) as info:
            await save_snapshot(sock, tmp_path / "state.bin", tmp_path / "memory.bin")
        return info.value

    err = _run_with_server(sock, _http_server(responses, requests), client)
    assert (err.method, err.path, err.status) == ("PATCH", "/vm", 400)
    assert len(requests) == 1  # no /snapshot/create after a failed pause


def test_unknown_path_is_not_in_the_schema(contract: dict) -> None:
    with pytest.raises(AssertionError):
        _operation(contract, "PUT", "/no-such-resource")


# ---------------------------------------------------------------- vsock reply

@pytest.mark.parametrize("line, port", [
    (b"OK 1\n", 1),
    (b"OK 1024\n", 1024),
    (b"OK 1073741824\n", 1073741824),
    (b"OK 4294967295\n", 4294967295),
])
def test_parse_vsock_ok_accepts(line: bytes, port: int) -> None:
    assert parse_vsock_ok(line) == port


@pytest.mark.parametrize("line", [
    b"OK\n", b"OK \n", b"OK abc\n", b"OK 5", b"OK 5\r\n", b"OK  5\n", b" OK 5\n", b"ok 5\n",
    b"OK 5\n\n", b"OK -5\n", b"OK +5\n", b"OK 0\n", b"OK 05\n", b"OK 4294967296\n",
    b"OK 99999999999\n", b"ERR connection refused\n", b"", b"\n",
    b"OK " + b"1" * 40 + b"\n", b"OK 5\n" + b" " * 40,
])
def test_parse_vsock_ok_rejects(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_vsock_ok(line)


def _run_with_server(sock: Path, handler, client):
    """Run ``client()`` against a UNIX-socket server calling ``handler(reader, writer)``."""
    async def main():
        server = await asyncio.start_unix_server(handler, path=str(sock))
        try:
            return await client()
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def test_vsock_connect_returns_the_stream_after_ok(tmp_path: Path) -> None:
    seen: list[bytes] = []

    async def firecracker(reader, writer):
        seen.append(await reader.readline())
        # Guest bytes in the same segment as the OK line belong to the channel.
        writer.write(b"OK 1073741824\nhello")
        await writer.drain()
        seen.append(await reader.read())
        writer.close()

    async def client():
        reader, writer = await vsock_connect(tmp_path / "v.sock", 1024, timeout=5)
        data = await reader.readexactly(5)
        writer.close()
        await writer.wait_closed()
        return data

    assert _run_with_server(tmp_path / "v.sock", firecracker, client) == b"hello"
    assert seen[0] == b"CONNECT 1024\n"


@pytest.mark.parametrize("reply, error", [
    (b"ERR no listener\n", ProtocolError),
    (b"OK 5", ProtocolError),              # no newline, then EOF
    (b"X" * 100, ProtocolError),           # over-long, no newline
    (b"", ConnectionResetError),           # guest port not listening: closed, no reply
])
def test_vsock_connect_failure_closes_the_socket(tmp_path: Path, reply: bytes, error) -> None:
    async def client():
        hung_up = asyncio.get_running_loop().create_future()

        async def firecracker(reader, writer):
            await reader.readline()
            writer.write(reply)
            await writer.drain()
            if not reply.startswith(b"X"):  # the over-long reply just stops, no EOF
                writer.write_eof()
            # The client must hang up on its own: no half-open socket.
            hung_up.set_result(await reader.read() == b"")
            writer.close()

        server = await asyncio.start_unix_server(firecracker, path=str(tmp_path / "v.sock"))
        try:
            with pytest.raises(error):
                await vsock_connect(tmp_path / "v.sock", 1024, timeout=5)
            return await asyncio.wait_for(hung_up, 5)
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(client()) is True


def test_vsock_connect_missing_socket_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        asyncio.run(vsock_connect(tmp_path / "absent.sock", 1024, timeout=1))


# ----------------------------------------------------------------- API client

def _http_server(responses: list[bytes], requests: list[tuple[bytes, dict, bytes]]):
    """A handler answering one HTTP request per connection with the next canned response."""
    async def handler(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines[1:])}
        body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
        requests.append((lines[0], headers, body))
        response = responses.pop(0)
        if response:
            writer.write(response)
            await writer.drain()
            writer.close()
        else:
            await asyncio.sleep(10)  # never answer
    return handler


def test_api_request_204_then_400_with_fault_message(tmp_path: Path) -> None:
    fault = json.dumps({"fault_message": "Invalid vCPU count."}).encode()
    responses = [b"HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\n\r\n",
                 b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(fault)).encode() + b"\r\n\r\n" + fault]
    requests: list = []
    sock = tmp_path / "fc.sock"

    async def client():
        ok = await api_request(sock, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 512})
        with pytest.raises(FirecrackerAPIError) as info:
            await api_request(sock, "PUT", "/machine-config", {"vcpu_count": 99, "mem_size_mib": 512})
        return ok, info.value

    ok, err = _run_with_server(sock, _http_server(responses, requests), client)
    assert ok is None
    assert (err.method, err.path, err.status) == ("PUT", "/machine-config", 400)
    assert err.fault_message == "Invalid vCPU count."
    assert "Invalid vCPU count." in str(err) and "400" in str(err)
    assert isinstance(err, SmolVMError) and isinstance(err, RuntimeError)
    line, headers, body = requests[0]
    assert line == b"PUT /machine-config HTTP/1.1"
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body)
    assert json.loads(body) == {"vcpu_count": 2, "mem_size_mib": 512}


def test_api_request_returns_a_json_body(tmp_path: Path) -> None:
    info = b'{"id":"0123456789ab","state":"Running","vmm_version":"1.17.0"}'
    responses = [b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(info)).encode() + b"\r\n\r\n" + info]
    requests: list = []
    sock = tmp_path / "fc.sock"
    result = _run_with_server(sock, _http_server(responses, requests),
                              lambda: api_request(sock, "GET", "/", None))
    assert result == json.loads(info)
    assert requests[0][0] == b"GET / HTTP/1.1" and requests[0][2] == b""


@pytest.mark.parametrize("response, match", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n{}", "exceeds"),   # body over the bound
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "exceed"),    # headers over the bound
    (b"SSH-2.0-OpenSSH\r\n\r\n", "status line"),                           # not HTTP
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "ended after 2"),  # body cut short
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n[1]", "JSON object"),   # not a JSON object
])
def test_api_request_rejects_bad_responses(tmp_path: Path, response: bytes, match: str) -> None:
    sock = tmp_path / "fc.sock"

    async def client():
        with pytest.raises(ProtocolError, match=match):
            await api_request(sock, "GET", "/", None)

    _run_with_server(sock, _http_server([response], []), client)


def test_api_request_times_out_as_an_api_error(tmp_path: Path) -> None:
    sock = tmp_path / "fc.sock"

    async def client():
        with pytest.raises(FirecrackerAPIError) as info:
            await api_request(sock, "PUT", "/actions", {"action_type": "InstanceStart"}, timeout=0.2)
        return info.value

    err = _run_with_server(sock, _http_server([b""], []), client)
    assert err.status == 0


def test_api_request_refuses_header_injection(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        asyncio.run(api_request(tmp_path / "fc.sock", "PUT", "/drives/a\r\nX: y", {}))


# ------------------------------------------------------------------- backend

def test_backend_identity() -> None:
    assert FirecrackerBackend.name == "firecracker"
    assert FirecrackerBackend.channel_kind == "vsock"


def test_firecracker_available_names_a_missing_binary() -> None:
    ok, why = firecracker_available("smolvm-no-such-firecracker")
    assert not ok
    assert why == "smolvm-no-such-firecracker not found on PATH"


def test_network_and_seed_requests_validate_and_keep_the_order(contract: dict, spec: VMSpec) -> None:
    import dataclasses

    netspec = dataclasses.replace(spec, tap_name="smv0123456789a", mac="52:54:01:23:45:67",
                                  seed=spec.run_dir / "seed.img", transport="ssh")
    requests = boot_requests(netspec, netspec.run_dir)
    for method, path, body in requests:
        _assert_valid(contract, method, path, body)
    paths = [p for _, p, _ in requests]
    assert paths[2:6] == ["/drives/base", "/drives/scratch", "/drives/seed", "/network-interfaces/net0"]
    bodies = dict((p, b) for _, p, b in requests)
    assert bodies["/network-interfaces/net0"] == {"iface_id": "net0", "host_dev_name": "smv0123456789a",
                                                  "guest_mac": "52:54:01:23:45:67"}
    assert bodies["/drives/seed"]["is_read_only"] is True
    assert "smolvm.channel=ssh" in bodies["/boot-source"]["boot_args"].split()


def test_contract_is_closed_and_refuses_an_unknown_field(contract: dict) -> None:
    # Firecracker answers 400 to a field it does not know: a misspelt key must fail here too.
    for name, definition in contract["definitions"].items():
        assert definition.get("additionalProperties") is False, f"{name} is not closed"
    body = {"vcpu_count": 2, "mem_size_mib": 512, "vcpus": 2}
    assert list(_validator(contract, "#/definitions/MachineConfiguration").iter_errors(body))


def test_every_path_the_backend_names_is_in_the_contract(contract: dict) -> None:
    source = "".join(Path(m.__file__).read_text() for m in (firecracker_module, firecracker_api_module))
    named = set(re.findall(r'"(PUT|PATCH)", "(/[\w/-]+)"', source))
    assert {p for _, p in named} >= {"/machine-config", "/vm", "/snapshot/create", "/snapshot/load",
                                     "/network-interfaces/net0"}
    for method, path in named:
        _operation(contract, method, path)
