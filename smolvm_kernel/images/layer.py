"""A course's pip layer, and its merge onto a base root file system.

The layer is installed by the host's pip into a folder (``--target``), wheels
only (``--only-binary=:all:`` for the guest's platform): no package's
``setup.py`` or build backend runs on the build host. The kernel's own pinned
packages are constraints, so a course cannot change their versions.

The merge streams the base squashfs through ``sqfs2tar`` into ``tarfile``,
copies every entry to ``tar2sqfs`` except those the layer replaces, then
appends the layer under ``/usr/local/lib/python3.11/dist-packages``: no root,
no mount, no unpacked copy of the base on disk.
"""

from __future__ import annotations

import email.parser
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

from smolvm_kernel.errors import CommandFailed, ImageBuildError
from smolvm_kernel.images import course as course_mod
from smolvm_kernel.images import recipe

_PIP_LINE = re.compile(r"^\s*(Collecting|File was already downloaded|Saved|Successfully installed|ERROR:)")


def pip_install(requirements: str, target: Path, wheels: Path, work: Path,
                say: Callable[[str], None], constraints: str | None = None) -> dict[str, int]:
    """Install ``requirements`` for the guest into ``target``; how many wheels were reused or downloaded.

    Two steps: ``pip download`` into ``wheels`` (a wheel already there is not
    fetched again: a rebuild downloads only what changed), then ``pip install
    --no-index`` from that folder alone."""
    req = work / "requirements.txt"
    req.write_text(requirements)
    con = work / "constraints.txt"
    con.write_text(constraints if constraints is not None else recipe.guest_requirements())
    wheels.mkdir(parents=True, exist_ok=True)
    guest = ["--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11",
             *[f"--platform={p}" for p in course_mod.PIP_PLATFORMS], "-c", str(con), "-r", str(req)]
    common = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    counts = {"cached": 0, "downloaded": 0}
    _pip(common[:3] + ["download"] + common[3:] + ["--dest", str(wheels), *guest], say, counts)
    _pip(common[:3] + ["install"] + common[3:] + ["--no-index", "--find-links", str(wheels), "--no-compile",
                                                   "--target", str(target), *guest], say, counts,
         re.compile(r"^\s*(Successfully installed|ERROR:)"))
    # Console scripts carry the build host's interpreter in their #! line; data
    # files (share/) land outside any path the guest reads.
    for sub in ("bin", "share"):
        shutil.rmtree(target / sub, ignore_errors=True)
    return counts


def _pip(argv: list[str], say: Callable[[str], None], counts: dict[str, int],
         show: re.Pattern = _PIP_LINE) -> list[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PIP_NO_WARN_SCRIPT_LOCATION": "1"})
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-30:]
        if line.lstrip().startswith("File was already downloaded"):
            counts["cached"] += 1
        elif line.lstrip().startswith("Saved "):
            counts["downloaded"] += 1
        if show.match(line):
            say("  pip: " + line.strip())
    rc = proc.wait()
    if rc != 0:
        text = "\n".join(tail)
        hint = "pip could not install the course's requirements.txt for the guest (pip's message is above)"
        if "from versions: none" in text or "No matching distribution" in text:
            hint += ("; wheels only are used (no package's setup.py runs on the build host), so a package "
                     "must exist on PyPI with a wheel for CPython 3.11 on manylinux x86_64: check its name "
                     "and version on pypi.org, or choose a version that ships wheels")
        if "conflict" in text.lower() or "ResolutionImpossible" in text:
            hint += ("; the kernel's own packages (smolvm_kernel/images/guest-requirements.txt) and the "
                     "base's Debian Python packages are pinned, and a course cannot change them")
        raise CommandFailed([*argv[:4], "...", "-r", "requirements.txt"], rc, text, hint=hint)
    return tail


def drop_present(target: Path, present: dict[str, str]) -> list[str]:
    """Remove from the layer the distributions the base already has at the same version."""
    dropped = []
    for name, version, info in distributions(target):
        if present.get(_norm(name)) != version:
            continue
        record = info / "RECORD"
        if record.exists():
            for line in record.read_text().splitlines():
                rel = line.split(",", 1)[0]
                path = (target / rel).resolve()
                if path.is_relative_to(target.resolve()) and path.is_file():
                    path.unlink()
        shutil.rmtree(info, ignore_errors=True)
        dropped.append(f"{name}=={version}")
    # Folders the removals emptied (deepest first).
    for root, dirs, files in sorted(os.walk(target), key=lambda w: -len(w[0])):
        if root != str(target) and not os.listdir(root):
            os.rmdir(root)
    return dropped


def distributions(site: Path) -> list[tuple[str, str, Path]]:
    """(name, version, dist-info folder) of every distribution installed in ``site``."""
    out = []
    for info in sorted(site.glob("*.dist-info")):
        meta = info / "METADATA"
        if meta.is_file():
            name, version = metadata_name_version(meta.read_text(errors="replace"))
            if name:
                out.append((name, version, info))
    return out


def metadata_name_version(text: str) -> tuple[str, str]:
    """Name and Version from a METADATA (or PKG-INFO) file's headers."""
    msg = email.parser.HeaderParser().parsestr(text)
    return (msg.get("Name") or "").strip(), (msg.get("Version") or "").strip()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_python_packages(base: Path) -> dict[str, str]:
    """Normalized name -> version of the Python distributions in a base squashfs (from folder names)."""
    out: dict[str, str] = {}
    for site in ("/usr/lib/python3/dist-packages", "/" + course_mod.SITE):
        proc = subprocess.run(["rdsquashfs", "-l", site, str(base)], capture_output=True, text=True)
        if proc.returncode != 0:
            continue
        for line in proc.stdout.split():
            entry = line.rstrip("/").rsplit("/", 1)[-1]
            m = re.match(r"^(.+?)-(\d[^-]*?)(?:-py\d[.\d]*)?\.(dist-info|egg-info)$", entry)
            version = _public_version(m.group(2)) if m else None
            if version:
                out[_norm(m.group(1))] = version
    return out


def _public_version(text: str) -> str | None:
    """The PEP 440 public version of a Debian-installed distribution; None if it has none
    (Debian writes 0.0.0 for some, and +dfsg local labels for repacked sources)."""
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(text)
    except InvalidVersion:
        return None
    return None if v.public in ("0", "0.0", "0.0.0") else v.public


def parse_dpkg_status(text: str, wanted: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of ``wanted`` from a dpkg status file."""
    out = {}
    for para in text.split("\n\n"):
        fields = {}
        for line in para.splitlines():
            if line[:1] not in (" ", "\t") and ":" in line:
                k, v = line.split(":", 1)
                fields[k] = v.strip()
        if fields.get("Package") in wanted and fields.get("Status", "").endswith(" installed"):
            out[fields["Package"]] = fields.get("Version", "")
    return out


def compile_layer(layer: Path, say: Callable[[str], None]) -> bool:
    """Precompile the layer's bytecode for the guest's Python 3.11 (its root file system is read-only)."""
    python = sys.executable if sys.version_info[:2] == (3, 11) else shutil.which("python3.11")
    if python is None:
        say("  no Python 3.11 on this host: the layer is not precompiled (imports compile in memory)")
        return False
    proc = subprocess.run([python, "-m", "compileall", "-q", "-j0", "-s", str(layer), "-p", "/" + course_mod.SITE,
                           str(layer)], capture_output=True, text=True)
    if proc.returncode != 0:
        # A file that does not compile (a template named .py, a py2 leftover) is not fatal: Python
        # would compile the others at import too; say so.
        say(f"  compileall: {(proc.stdout + proc.stderr).strip().splitlines()[-1:]}")
    return True


def merge(base: Path, layer: Path, out: Path, prefix: str = course_mod.SITE,
          watch: tuple[str, ...] = ("var/lib/dpkg/status",)) -> dict[str, bytes]:
    """Write ``out``: ``base`` with ``layer`` added under ``prefix`` (layer wins); return the ``watch`` files."""
    layer_entries = _layer_entries(layer, prefix)
    layer_files = {name for name, path in layer_entries if not path.is_dir() or path.is_symlink()}
    layer_dirs = {name for name, path in layer_entries if path.is_dir() and not path.is_symlink()}
    seen: dict[str, bytes] = {}
    rd_argv = ["sqfs2tar", "--root-becomes", ".", "--no-xattr", str(base)]
    sq_argv = ["tar2sqfs", "--quiet", "--force", "--compressor", "zstd", "--no-xattr", str(out)]
    rd = subprocess.Popen(rd_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sq = subprocess.Popen(sq_argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    dropped: set[str] = set()
    try:
        src = tarfile.open(fileobj=rd.stdout, mode="r|")
        dst = tarfile.open(fileobj=sq.stdin, mode="w|", format=tarfile.PAX_FORMAT)
        for member in src:
            name = member.name.removeprefix("./").rstrip("/")
            if name in layer_files or (name in layer_dirs and not member.isdir()):
                dropped.add(name)
                continue
            if member.islnk() and member.linkname.removeprefix("./") in dropped:
                continue
            if name in layer_dirs:
                layer_dirs.discard(name)       # the base's folder stays, with its owner and mode
            if member.isfile():
                data = src.extractfile(member)
                if name in watch:
                    content = data.read()
                    seen[name] = content
                    data = io.BytesIO(content)
                dst.addfile(member, data)
            else:
                dst.addfile(member)
        for name, path in layer_entries:
            if path.is_dir() and not path.is_symlink() and name not in layer_dirs:
                continue
            info = dst.gettarinfo(str(path), arcname="./" + name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isdir():
                info.mode = 0o755
            elif info.isfile():
                info.mode = 0o755 if info.mode & stat.S_IXUSR else 0o644
            if info.isfile():
                with open(path, "rb") as fh:
                    dst.addfile(info, fh)
            else:
                dst.addfile(info)
        dst.close()
        src.close()
    except BaseException:
        rd.kill()
        sq.kill()
        rd.wait()
        sq.wait()
        raise
    finally:
        if sq.stdin and not sq.stdin.closed:
            sq.stdin.close()
    rd_err = rd.stderr.read().decode(errors="replace")
    rd_rc = rd.wait()
    sq_err = sq.stderr.read().decode(errors="replace")
    sq_rc = sq.wait()
    if rd_rc != 0:
        raise CommandFailed(rd_argv, rd_rc, rd_err)
    if sq_rc != 0:
        raise CommandFailed(sq_argv, sq_rc, sq_err)
    if not out.exists():
        raise ImageBuildError(f"tar2sqfs wrote no {out}")
    return seen


def _layer_entries(layer: Path, prefix: str) -> list[tuple[str, Path]]:
    """(path in the guest, path on the host) of the layer and the folders above it, parents first."""
    out: list[tuple[str, Path]] = []
    parts = prefix.split("/")
    for i in range(1, len(parts) + 1):
        out.append(("/".join(parts[:i]), layer))
    for root, dirs, files in os.walk(layer):
        dirs.sort()
        rel = os.path.relpath(root, layer)
        for d in dirs:
            out.append((_join(prefix, rel, d), Path(root, d)))
        for f in sorted(files):
            out.append((_join(prefix, rel, f), Path(root, f)))
    return out


def _join(prefix: str, rel: str, name: str) -> str:
    return f"{prefix}/{name}" if rel == "." else f"{prefix}/{rel}/{name}"
