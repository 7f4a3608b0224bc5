"""Fixtures that boot real microVMs: image -> sandbox, each VM owned and killed.

Following Firecracker's test framework: a factory records every VM it
starts and stops all of them at the end; a failing test gets the guest
console attached to its report.
"""

from __future__ import annotations

import shutil

import pytest

from smolvm_kernel.images import ImageCache
from smolvm_kernel.vm.sandbox import Sandbox


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def image():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    # Build on first use, like `smolvm-kernel setup`; cached by content hash.
    return ImageCache().ensure("base")


class SandboxFactory:
    def __init__(self) -> None:
        self.sandboxes: list[Sandbox] = []

    def __call__(self, **kwargs) -> Sandbox:
        sb = Sandbox(**{"vcpus": 2, "mem_mib": 512, "backend": "qemu", **kwargs})
        self.sandboxes.append(sb)
        sb.start()
        return sb

    def stop_all(self) -> None:
        for sb in self.sandboxes:
            sb.stop()


@pytest.fixture(scope="session")
def sandbox_factory(image):
    factory = SandboxFactory()
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def _shared_sandbox(sandbox_factory) -> Sandbox:
    return sandbox_factory()


@pytest.fixture
def sandbox(_shared_sandbox, request) -> Sandbox:
    """One VM shared by the tests that do not destroy it. Found dead before a
    test (a death no test asked for), it fails that test with the death and the
    guest console: an unexplained death is a finding, not noise. The VM is reset
    first, so the tests after it still run."""
    from smolvm_kernel.vm.sandbox import SandboxState

    if _shared_sandbox.state == SandboxState.DEAD:
        found = (f"the shared test VM was found dead before {request.node.nodeid}: {_shared_sandbox._death}\n"
                 + (_shared_sandbox.backend.console_tail(3000) if _shared_sandbox.backend else ""))
        _shared_sandbox.reset()
        pytest.fail(found, pytrace=False)
    return _shared_sandbox


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    factory = item.funcargs.get("sandbox_factory")
    candidates = [item.funcargs.get("sandbox"), *(factory.sandboxes if factory else [])]
    seen = set()
    for sb in candidates:
        if sb is not None and sb.backend is not None and sb.vm_id not in seen:
            seen.add(sb.vm_id)
            report.sections.append((f"guest console {sb.vm_id}", sb.backend.console_tail(6000)))


@pytest.fixture(scope="session")
def kernelspec(image):
    """Install smolvm-python (and a scipy variant) into the test's Jupyter path."""
    import os

    from smolvm_kernel.jupyter import kernelspec as ks

    prefix = os.environ["SMOLVM_TEST_PREFIX"]
    ks.install("smolvm-python", prefix=prefix, backend="qemu")
    return "smolvm-python"


@pytest.fixture(scope="session")
def notebook_dir(tmp_path_factory):
    """The folder the tests' kernels start in, as a notebook's: it becomes their
    VMs' working folder (vm/workdir.py), so it must not be the repository."""
    return tmp_path_factory.mktemp("notebook")


@pytest.fixture(scope="module")
def kernel(kernelspec, notebook_dir):
    """A running SmolVM Python kernel (its VM booted) and a client."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name=kernelspec, startup_timeout=60, cwd=str(notebook_dir))
    kc.execute_interactive("pass", timeout=120)     # wait for the VM
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=False)


#: The test course (tests/vm/test_course_image.py; the classroom test offers it to students).
COURSE = "smolvm-test-course"
REQUIREMENTS = "tabulate==0.9.0\nmsgpack==1.1.0\n"
APT = "# a tiny binary the course's notebooks call\njq\n"


@pytest.fixture(scope="session")
def course_image(image, tmp_path_factory):
    """A course image built from a folder (requirements.txt, apt.txt), once per
    session and cached by content hash."""
    from smolvm_kernel.images import ImageCache
    from smolvm_kernel.images.course import read_folder

    folder = tmp_path_factory.mktemp("course")
    (folder / "requirements.txt").write_text(REQUIREMENTS)
    (folder / "apt.txt").write_text(APT)
    (folder / "notebook.ipynb").write_text("{}")
    return ImageCache().build_course(read_folder(folder, COURSE))
