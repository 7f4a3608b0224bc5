"""QEMU's vsock transport (vhost-vsock): only where the host has /dev/vhost-vsock."""

from __future__ import annotations

import pytest

from smolvm_kernel.vm.boot import qemu_vsock_available


@pytest.mark.skipif(not qemu_vsock_available(),
                    reason="/dev/vhost-vsock is absent on this host (modprobe vhost_vsock), so QEMU "
                           "cannot give the guest a vsock device; transport='auto' uses virtio-serial")
def test_qemu_vsock_transport(sandbox_factory):
    sb = sandbox_factory(transport="vsock")
    assert sb.stats()["transport"] == "vsock"
    outs = list(sb.execute("print('over vsock'); 6 * 7"))
    assert any(o.type == "stream" and "over vsock" in o.text for o in outs)
    assert any(o.type == "execute_result" and "42" in o.text for o in outs)
