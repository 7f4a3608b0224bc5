"""A course image built from a folder, the way Binder builds one, booted for real.

The course folder holds one small pure-Python package neither built-in image
has (tabulate), one with a compiled extension (msgpack) and one tiny Debian
package (jq, through apt.txt). Built once per session and cached by content
hash, so a rerun only boots.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from smolvm_kernel.errors import CommandFailed
from smolvm_kernel.images import ImageCache, recipe
from smolvm_kernel.images.course import read_folder

COURSE = "smolvm-test-course"    # the course_image fixture's (tests/vm/conftest.py)


@pytest.fixture(scope="module")
def course_vm(course_image, sandbox_factory):
    return sandbox_factory(profile=COURSE)


def run(sb, code) -> str:
    outs = list(sb.execute(textwrap.dedent(code)))
    errors = [o for o in outs if o.type == "error"]
    assert not errors, errors
    return "".join(o.text for o in outs if o.type == "stream")


def test_manifest_lists_what_the_course_added(course_image):
    manifest = recipe.read_manifest(course_image.directory)
    assert manifest["packages"]["pip"] == {"msgpack": "1.1.0", "tabulate": "0.9.0"}
    assert list(manifest["packages"]["apt"]) == ["jq"] and manifest["packages"]["apt"]["jq"]
    assert manifest["source"]["files"] == ["requirements.txt", "apt.txt"]
    assert ImageCache().get(COURSE).key == course_image.key


def test_both_packages_import_and_work(course_vm):
    out = run(course_vm, """
        import tabulate, msgpack
        print(tabulate.__version__, msgpack.version)
        print(tabulate.tabulate([[1, 2]], headers=["a", "b"], tablefmt="plain").split())
        assert msgpack.unpackb(msgpack.packb({"x": [1, 2.5]})) == {"x": [1, 2.5]}
    """)
    assert "0.9.0 (1, 1, 0)" in out
    assert "['a', 'b', '1', '2']" in out


def test_compiled_package_uses_its_c_extension(course_vm):
    out = run(course_vm, """
        import msgpack, msgpack._cmsgpack as c
        print(msgpack.Packer is c.Packer, c.__file__)
    """)
    assert out.startswith("True /usr/local/lib/python3.11/dist-packages/msgpack/_cmsgpack.cpython-311-x86_64")


def test_layer_is_precompiled_for_the_read_only_root(course_vm):
    # The root file system is read-only: a .pyc that does not match its source would be
    # recompiled in memory at every import. importlib's own check says whether it matches.
    out = run(course_vm, """
        import importlib.util, tabulate
        spec = importlib.util.find_spec("tabulate")
        loader = spec.loader
        data = loader.get_data(importlib.util.cache_from_source(spec.origin))
        from importlib._bootstrap_external import _validate_timestamp_pyc
        st = loader.path_stats(spec.origin)
        _validate_timestamp_pyc(data, int(st["mtime"]), st["size"], "tabulate", {})
        print("pyc ok")
    """)
    assert "pyc ok" in out


def test_apt_binary_runs(course_vm):
    out = run(course_vm, """
        import subprocess
        print(subprocess.run(["jq", "-c", ".a"], input='{"a": [1]}', capture_output=True, text=True).stdout)
    """)
    assert out.strip() == "[1]"


def test_kernels_own_packages_are_unchanged(course_vm):
    pins = dict(line.split("==") for line in recipe.guest_requirements().splitlines()
                if line and not line.startswith("#"))
    out = run(course_vm, """
        import importlib.metadata as md, json
        print(json.dumps({d.metadata["Name"]: d.version for d in md.distributions()}))
    """)
    installed = {k.lower().replace("-", "_"): v for k, v in json.loads(out).items()}
    for name, version in pins.items():
        assert installed[name.lower().replace("-", "_")] == version, name


def test_a_package_that_does_not_exist_fails_the_build_and_leaves_nothing(image, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "requirements.txt").write_text("tabulate==0.9.0\nsmolvm-no-such-package-xq7==1.0\n")
    cache = ImageCache()
    before_images = set(cache.images_dir.iterdir())
    before_parts = {p for p in cache.parts_dir.iterdir() if p.name != "wheels"}
    with pytest.raises(CommandFailed) as info:
        cache.build_course(read_folder(folder, "smolvm-test-bad"), progress=lambda line: None)
    assert "smolvm-no-such-package-xq7" in str(info.value)
    assert "No matching distribution" in str(info.value) or "from versions: none" in str(info.value)
    assert set(cache.images_dir.iterdir()) == before_images
    assert {p for p in cache.parts_dir.iterdir() if p.name != "wheels"} == before_parts
    assert "smolvm-test-bad" not in cache.courses()
