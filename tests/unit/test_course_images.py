"""Course images: the folder's files, the recipe's hash, profiles by name, the layer's merge."""

from __future__ import annotations

import io
import subprocess
import tarfile

import pytest
from traitlets import TraitError

from smolvm_kernel.errors import ConfigError
from smolvm_kernel.images import ImageCache, course, layer

KERNEL = "linux-image-x=1"


def folder_with(tmp_path, **files):
    for name, text in files.items():
        path = tmp_path / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_reads_requirements_apt_and_runtime(tmp_path):
    f = folder_with(tmp_path, **{"requirements.txt": "tabulate==0.9.0\n# comment\nmsgpack>=1\n",
                                 "apt.txt": "# tools\njq\nlibgomp1  # for numba\njq\n", "runtime.txt": "python-3.11\n"})
    c = course.read_folder(f, "ds101")
    assert c.apt == ("jq", "libgomp1")
    assert c.files == ("requirements.txt", "apt.txt", "runtime.txt")
    assert c.rootfs_profile.apt[-2:] == ("jq", "libgomp1")


def test_binder_subfolder_is_read_instead_of_the_top(tmp_path):
    f = folder_with(tmp_path, **{"binder__requirements.txt": "tabulate\n", "setup.py": "raise SystemExit"})
    assert course.read_folder(f, "ds101").files == ("binder/requirements.txt",)


@pytest.mark.parametrize("name, words", [
    ("environment.yml", "no conda"), ("postBuild", "as root on the build host"), ("start", "every start"),
    ("Dockerfile", "not Docker"), ("install.R", "R is not"), ("Project.toml", "Julia"),
    ("setup.py", "pip install ."), ("pyproject.toml", "pip install ."),
])
def test_refused_files_say_why(tmp_path, name, words):
    f = folder_with(tmp_path, **{"requirements.txt": "tabulate\n", name: "x"})
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")) as info:
        course.read_folder(f, "ds101")
    assert words in str(info.value)


@pytest.mark.parametrize("apt", ["JQ\n", "jq=1.6\n", "-y\n", "j\n", "jq;rm\n"])
def test_bad_apt_names_are_refused(tmp_path, apt):
    f = folder_with(tmp_path, **{"apt.txt": apt})
    with pytest.raises(ConfigError, match="not a Debian package name"):
        course.read_folder(f, "ds101")


@pytest.mark.parametrize("line, words", [
    ("-e .", "pip options"), ("--index-url http://evil/", "pip options"), ("-r other.txt", "pip options"),
    ("pkg @ https://x/y.whl", "URL or path"), ("not a req!", "not a requirement"),
])
def test_requirements_that_leave_pypi_are_refused(tmp_path, line, words):
    f = folder_with(tmp_path, **{"requirements.txt": f"tabulate\n{line}\n"})
    with pytest.raises(ConfigError, match=words):
        course.read_folder(f, "ds101")


@pytest.mark.parametrize("runtime", ["python-3.12", "python-3.11.4", "r-4.1-2021-10-01"])
def test_runtime_other_than_the_guests_python_is_refused(tmp_path, runtime):
    f = folder_with(tmp_path, **{"requirements.txt": "tabulate\n", "runtime.txt": runtime})
    with pytest.raises(ConfigError, match="Debian bookworm's 3.11"):
        course.read_folder(f, "ds101")


def test_empty_folder_and_bad_names_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="neither requirements.txt nor apt.txt"):
        course.read_folder(folder_with(tmp_path, **{"requirements.txt": "# nothing\n"}), "ds101")
    f = folder_with(tmp_path, **{"requirements.txt": "tabulate\n"})
    for bad in ("base", "scipy", "DS101", "1abc", "a" * 33, "ds_101", ""):
        with pytest.raises(ConfigError, match="profile"):
            course.read_folder(f, bad)
    with pytest.raises(ConfigError, match="base"):
        course.read_folder(f, "ds101", base="torch")


def test_course_key_changes_with_its_inputs_only(tmp_path):
    c = course.Course("ds101", "base", "tabulate==0.9.0\n", (), "", str(tmp_path), ("requirements.txt",))
    k = course.course_key(c, KERNEL)
    import dataclasses
    assert course.course_key(dataclasses.replace(c, requirements="tabulate==0.8.10\n"), KERNEL) != k
    assert course.course_key(dataclasses.replace(c, apt=("jq",)), KERNEL) != k
    assert course.course_key(dataclasses.replace(c, base="scipy"), KERNEL) != k
    assert course.course_key(c, "linux-image-x=2") != k
    # Where the folder was, and what it was called, do not change what is built.
    assert course.course_key(dataclasses.replace(c, folder="/elsewhere", files=()), KERNEL) == k
    assert course.course_key(course.Course.from_json(c.to_json()), KERNEL) == k


def test_profile_check_accepts_a_registered_course_and_lists_what_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(tmp_path))
    from smolvm_kernel.config import SandboxConfig

    with pytest.raises(TraitError) as info:
        SandboxConfig(profile="ds101")
    assert "choose one of base, scipy, or build a course image" in str(info.value)
    assert "image build --profile NAME --from FOLDER" in str(info.value)
    course.register(tmp_path, course.Course("ds101", "base", "tabulate\n"))
    assert SandboxConfig(profile="ds101").profile == "ds101"
    with pytest.raises(TraitError, match="choose one of base, scipy, ds101"):
        SandboxConfig(profile="ds102")
    with pytest.raises(ConfigError, match="choose one of base, scipy, ds101"):
        ImageCache(tmp_path).get("ds102")


def test_manifest_packages_from_metadata_and_dpkg_status(tmp_path):
    info = tmp_path / "Tabulate-0.9.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tabulate\nVersion: 0.9.0\n\nlong text\nName: x\n")
    assert [(n, v) for n, v, _ in layer.distributions(tmp_path)] == [("tabulate", "0.9.0")]
    status = ("Package: jq\nStatus: install ok installed\nVersion: 1.6-2.1\n\n"
              "Package: libjq1\nStatus: install ok installed\nVersion: 1.6-2.1\n\n"
              "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n")
    assert layer.parse_dpkg_status(status, ("jq", "gone")) == {"jq": "1.6-2.1"}


def test_public_versions_of_debian_python_packages():
    assert layer._public_version("4.0.2+dfsg") == "4.0.2"
    assert layer._public_version("0.0.0") is None
    assert layer._public_version("not-a-version") is None


def _sqfs(path, entries):
    """A small squashfs from (name, data or None for a folder)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    subprocess.run(["tar2sqfs", "--quiet", "--force", str(path)], input=buf.getvalue(), check=True)


def _read_sqfs(path):
    tar = subprocess.run(["sqfs2tar", str(path)], capture_output=True, check=True).stdout
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in t.getmembers():
            out[m.name.rstrip("/")] = (t.extractfile(m).read() if m.isfile() else None, m)
    return out


def test_merge_adds_the_layer_and_replaces_what_it_overlaps(tmp_path):
    site = course.SITE
    base = tmp_path / "base.sqfs"
    _sqfs(base, [("usr", None), ("usr/local", None), ("usr/local/lib", None), ("usr/local/lib/python3.11", None),
                 (site, None), (f"{site}/six.py", b"old six"), (f"{site}/keep.py", b"kept"),
                 ("var/lib/dpkg/status", b"Package: jq\nStatus: install ok installed\nVersion: 1\n")])
    lay = tmp_path / "layer"
    (lay / "pkg").mkdir(parents=True)
    (lay / "six.py").write_text("new six")
    (lay / "pkg" / "__init__.py").write_text("x = 1")
    (lay / "pkg" / "tool").write_text("#!/bin/sh")
    (lay / "pkg" / "tool").chmod(0o700)
    out = tmp_path / "out.sqfs"
    seen = layer.merge(base, lay, out)
    assert b"Package: jq" in seen["var/lib/dpkg/status"]
    files = _read_sqfs(out)
    assert files[f"{site}/six.py"][0] == b"new six"
    assert files[f"{site}/keep.py"][0] == b"kept"
    assert files[f"{site}/pkg/__init__.py"][0] == b"x = 1"
    tool = files[f"{site}/pkg/tool"][1]
    assert (tool.uid, tool.gid, tool.mode & 0o777) == (0, 0, 0o755)
    assert files[f"{site}/pkg"][1].mode & 0o777 == 0o755
    assert sum(1 for name in files if name.endswith("six.py")) == 1


def test_drop_present_removes_what_the_base_has_at_the_same_version(tmp_path):
    for name, version in (("six", "1.17.0"), ("tabulate", "0.9.0")):
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Name: {name}\nVersion: {version}\n")
        (tmp_path / f"{name}.py").write_text("")
        (info / "RECORD").write_text(f"{name}.py,,\n{info.name}/METADATA,,\n")
    assert layer.drop_present(tmp_path, {"six": "1.17.0", "tabulate": "0.8.0"}) == ["six==1.17.0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tabulate-0.9.0.dist-info", "tabulate.py"]
