"""The working folder's rules (vm/workdir.py): what is copied in, what comes back, and how."""

from __future__ import annotations

import os

import pytest

from smolvm_kernel.vm import guest_news
from smolvm_kernel.vm.workdir import Limits, Workdir, plan, refusal, valid_relative


def _folder(root):
    (root / "data").mkdir()
    (root / "data" / "x.csv").write_text("a,b\n1,2\n")
    (root / "helper.py").write_text("def hi(): return 1\n")
    (root / "nb.ipynb").write_text("{}")
    (root / ".secret").write_text("token")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "nb-checkpoint.ipynb").write_text("{}")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "helper.cpython-311.pyc").write_bytes(b"\0")
    os.symlink("/etc/passwd", root / "passwd")
    os.symlink("/etc", root / "etc")
    os.mkfifo(root / "fifo")


def _wd(root, guest_files: dict[str, bytes] | None = None, **limits):
    notes: list[str] = []
    files = guest_files or {}

    def get_file(path, limit):
        data = files[path]
        return data if len(data) <= limit else data[:limit + 1]

    wd = Workdir(root, "read-write", request=lambda op, **kw: {"ok": True}, get_file=get_file,
                 notice=notes.append, limits=Limits(**limits))
    return wd, notes, files


def _report(wd, files, removed=()):
    news = guest_news.agent_event({"event": "workdir_changed", "changed": [[k, len(v)] for k, v in files.items()],
                                   "removed": list(removed), "truncated": False}, 512, 1 << 20)
    wd.changed(*news.workdir)
    wd.finish(timeout=10)


def test_the_copy_in_takes_visible_regular_files_only(tmp_path):
    _folder(tmp_path)
    take, left = plan(tmp_path, Limits())
    assert sorted(rel for rel, _ in take) == ["data/x.csv", "helper.py", "nb.ipynb"]
    assert left == []


def test_the_copy_in_limits_leave_files_out_and_say_which(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}.bin").write_bytes(b"x" * 100)
    (tmp_path / "big.bin").write_bytes(b"x" * 1000)
    take, left = plan(tmp_path, Limits(total_bytes=350, files=10, file_bytes=500))
    assert [rel for rel, _ in take] == ["f0.bin", "f1.bin", "f2.bin"]
    reasons = dict(left)
    assert "over the 500 bytes a file" in reasons["big.bin"]
    assert "in all" in reasons["f3.bin"]
    take, left = plan(tmp_path, Limits(files=2))
    assert len(take) == 2 and "2-file limit" in dict(left)["f1.bin"]


def test_prepare_reads_the_files_into_batched_requests(tmp_path):
    _folder(tmp_path)
    (tmp_path / "large.bin").write_bytes(os.urandom(5 * 1024 * 1024))
    wd, _, _ = _wd(tmp_path)
    copied = wd.prepare()
    assert copied.note() == ""
    # helper.py | the first 4 MiB of large.bin | its last MiB, nb.ipynb, data/x.csv
    assert [r["op"] for r in wd.requests] == ["workdir_put"] * 3
    assert wd.requests[-1]["watch"] is True and wd.requests[0]["watch"] is False
    paths = [f["path"] for r in wd.requests for f in r["files"]]
    assert paths.count("large.bin") == 2 and "helper.py" in paths
    empty = tmp_path / "empty"
    empty.mkdir()
    wd, _, _ = _wd(empty)
    wd.prepare()
    assert wd.requests == [{"op": "workdir_watch"}]


@pytest.mark.parametrize("rel, refused", [
    ("out.csv", False), ("data/result.parquet", False), ("plot.png", False), ("model.pkl", False),
    ("new-notebook.ipynb", False), ("notes.txt", False),
    ("numpy.py", True), ("lib/helper.PY", True), ("evil.pth", True), ("_ext.cpython-311-x86_64-linux-gnu.so", True),
    ("libfoo.so.1", True), ("run.sh", True), ("Makefile", True), ("pyproject.toml", True), ("setup.cfg", True),
    ("conftest.py", True), ("requirements.txt", True), ("postBuild", True), ("jupyter_server_config.json", True),
    ("jupyter_notebook_config.py", True), ("ipython_config.py", True), ("templates/lab/index.html.j2", True),
    ("templates/lab/conf.json", True), ("custom.js", True), ("app.desktop", True), ("pkg/__init__.py", True),
])
def test_what_stays_in_the_vm(rel, refused):
    assert (refusal(rel, lambda folder: False) is not None) == refused


def test_a_file_in_a_package_folder_stays_in_the_vm():
    assert refusal("pkg/sub/data.txt", lambda folder: folder == "pkg") is not None
    assert refusal("pkg/sub/data.txt", lambda folder: False) is None


@pytest.mark.parametrize("rel", ["", ".bashrc", "a/.git/config", "../x", "a/../../x", "/etc/passwd", "a//b",
                                 "./x", "x/", "a\x00b", "a/" * 20 + "x", None, 5])
def test_paths_the_guest_may_not_name(rel):
    assert not valid_relative(rel)


def test_changed_files_come_back_and_code_does_not(tmp_path):
    _folder(tmp_path)
    wd, notes, files = _wd(tmp_path, {
        "out.csv": b"x\n1\n", "data/new/deep.txt": b"deep", "numpy.py": b"import os",
        "pkg/__init__.py": b"", "pkg/data.txt": b"d", "nb.ipynb": b'{"evil": 1}', "run.sh": b"rm -rf ~",
        ".bashrc": b"evil", "../escape.txt": b"x"})
    wd.prepare()
    _report(wd, files)
    assert (tmp_path / "out.csv").read_bytes() == b"x\n1\n"
    assert (tmp_path / "data" / "new" / "deep.txt").read_bytes() == b"deep"
    assert oct((tmp_path / "out.csv").stat().st_mode & 0o777) == "0o644"
    for absent in ("numpy.py", "pkg", "run.sh", ".bashrc"):
        assert not (tmp_path / absent).exists(), absent
    assert not (tmp_path.parent / "escape.txt").exists()
    assert (tmp_path / "nb.ipynb").read_text() == "{}"
    said = "".join(notes)
    for name in ("numpy.py", "pkg/__init__.py", "pkg/data.txt", "nb.ipynb", "run.sh", "%smolvm pull"):
        assert name in said, name
    assert not [p for p in tmp_path.rglob("*.part")]


def test_a_file_changed_on_both_sides_keeps_the_folders_copy(tmp_path):
    (tmp_path / "out.csv").write_text("host v1")
    wd, notes, files = _wd(tmp_path, {"out.csv": b"from the VM"})
    wd.prepare()
    (tmp_path / "out.csv").write_text("host v2, edited meanwhile")
    _report(wd, files)
    assert (tmp_path / "out.csv").read_text() == "host v2, edited meanwhile"
    assert (tmp_path / "out (VM).csv").read_bytes() == b"from the VM"
    assert "out (VM).csv" in "".join(notes)
    # unchanged on the host since the copy-in: the VM's version replaces it
    (tmp_path / "other.csv").write_text("host")
    wd2, _, files2 = _wd(tmp_path, {"other.csv": b"vm"})
    wd2.prepare()
    _report(wd2, files2)
    assert (tmp_path / "other.csv").read_text() == "vm"


def test_no_write_goes_through_or_over_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "nb"
    root.mkdir()
    os.symlink(outside, root / "linked")
    os.symlink(outside / "target.txt", root / "file.txt")
    wd, notes, files = _wd(root, {"linked/x.txt": b"x", "file.txt": b"y"})
    _report(wd, files)
    assert list(outside.iterdir()) == []
    assert os.path.islink(root / "file.txt") and os.path.islink(root / "linked")
    assert "file.txt" in "".join(notes)


def test_the_write_back_is_capped(tmp_path):
    wd, notes, files = _wd(tmp_path, {"a.bin": b"a" * 600, "b.bin": b"b" * 600, "huge.bin": b"h" * 2000},
                           file_bytes=1000, writeback_bytes=1000)
    _report(wd, files)
    assert (tmp_path / "a.bin").exists() and not (tmp_path / "b.bin").exists()
    assert not (tmp_path / "huge.bin").exists()
    said = "".join(notes)
    assert "huge.bin" in said and "b.bin" in said and "write-back limit" in said


def test_read_only_brings_nothing_back(tmp_path):
    notes: list[str] = []
    wd = Workdir(tmp_path, "read-only", request=lambda op, **kw: {"ok": True},
                 get_file=lambda p, n: b"x", notice=notes.append)
    wd.prepare()
    assert all(r.get("watch") is not True for r in wd.requests) and wd.requests == []
    wd.changed((("out.csv", 1),), (), False)
    wd.finish(timeout=1)
    assert not (tmp_path / "out.csv").exists()


def test_a_malformed_report_is_dropped():
    for bad in ({"changed": "x"}, {"changed": [["a", -1]]}, {"changed": [[1, 2]]}, {"changed": [["a"]]},
                {"changed": [["a", True]]}, {"changed": [["a", 1]] * 2001}, {"changed": [], "removed": [3]}):
        assert guest_news.agent_event({"event": "workdir_changed", **bad}, 512, 1) is None


def test_compressible_chunks_travel_compressed_and_come_out_whole(tmp_path):
    import base64
    import zlib

    (tmp_path / "table.csv").write_text("a,b,c\n" + "1.0,2.0,3\n" * 50000)
    (tmp_path / "noise.bin").write_bytes(os.urandom(100000))
    wd, _, _ = _wd(tmp_path)
    wd.prepare()
    items = {f["path"]: f for r in wd.requests for f in r["files"]}
    assert items["table.csv"]["z"] is True and "z" not in items["noise.bin"]
    data = zlib.decompress(base64.b64decode(items["table.csv"]["data"]))
    assert data == (tmp_path / "table.csv").read_bytes() and items["table.csv"]["size"] == len(data)
    assert len(items["table.csv"]["data"]) < len(data) / 10
