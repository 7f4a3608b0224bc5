"""Build a guest image from Debian packages: no Docker, no loop mounts.

Steps, each cached on its own so that changing the agent rebuilds only the
initramfs (about a second) and not the root file system (about a minute):

1. root file system: ``mmdebstrap`` (minbase) writes a tar stream, hooks add
   the unprivileged ``user``, the pinned Jupyter wheels and precompiled
   bytecode; ``tar2sqfs`` turns the stream into a zstd squashfs.
2. kernel: the Debian cloud kernel package, unpacked; ``vmlinuz`` as shipped
   and the ELF ``vmlinux`` extracted from it.
3. initramfs: busybox, the virtio modules and the guest agent, as a newc cpio.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from smolvm_kernel.errors import CommandFailed, ImageBuildError, ToolNotFound
from smolvm_kernel.images import course as course_mod
from smolvm_kernel.images import layer, recipe
from smolvm_kernel.images.image import Image

_TOOLS = {
    "mmdebstrap": "mmdebstrap (Debian: apt-get install mmdebstrap)",
    "tar2sqfs": "squashfs-tools-ng (Debian: apt-get install squashfs-tools-ng)",
    "apt-get": "apt (a Debian or Ubuntu host is needed to build images)",
    "apt-cache": "apt (a Debian or Ubuntu host is needed to build images)",
    "dpkg-deb": "dpkg",
    "lz4": "lz4 (Debian: apt-get install lz4)",
    "sqfs2tar": "squashfs-tools-ng (Debian: apt-get install squashfs-tools-ng)",
    "rdsquashfs": "squashfs-tools-ng (Debian: apt-get install squashfs-tools-ng)",
}
_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
#: After a build, parts younger than this are not pruned: another build (a course's,
#: not registered until it finishes) may be about to use the one it just made.
_GRACE_S = 3600


class ImageBuilder:
    """Build one profile's image into an image cache, atomically.

    ``cache`` is the :class:`~smolvm_kernel.images.cache.ImageCache` that asks
    (its folders, ``get`` and ``prune_stale``); the cache imports the builder,
    never the other way round."""

    def __init__(self, cache, profile: recipe.Profile,
                 progress: Callable[[str], None] | None = None) -> None:
        self.cache = cache
        self.profile = profile
        self._progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
        self._t0 = time.monotonic()

    def say(self, msg: str) -> None:
        self._progress(f"[{time.monotonic() - self._t0:6.1f}s] {msg}")

    @property
    def name(self) -> str:
        """The image's profile name (its folder is ``<name>-<hash>``)."""
        return self.profile.name

    def key(self, kernel_package: str) -> str:
        return recipe.image_key(self.profile, kernel_package)

    def build(self, force: bool = False) -> Image:
        t0 = time.monotonic()
        for tool, package in _TOOLS.items():
            if shutil.which(tool) is None:
                raise ToolNotFound(tool, package)
        kernel_pkg, kernel_ver = self._resolve_kernel()
        kernel_package = f"{kernel_pkg}={kernel_ver}"
        key = self.key(kernel_package)
        final = self.cache.images_dir / f"{self.name}-{key[:16]}"
        if final.is_dir() and not force and recipe.read_manifest(final):
            self.say(f"image {final.name} is up to date")
            self._register()
            return self.cache.get(self.name)
        self.cache.images_dir.mkdir(parents=True, exist_ok=True)
        self.cache.parts_dir.mkdir(parents=True, exist_ok=True)
        self.reused: list[str] = []
        with _staging(self.cache.images_dir, ".build-") as tmp:
            extra = self._write_rootfs(tmp / "rootfs.sqfs", force)
            kdir = self._kernel(kernel_pkg, kernel_ver)
            busybox = self._busybox()
            release = (kdir / "release").read_text().strip()
            os.link(kdir / "vmlinuz", tmp / "vmlinuz")
            os.link(kdir / "vmlinux", tmp / "vmlinux")
            self.say("writing initramfs")
            size = _write_initramfs(tmp / "initramfs.cpio", busybox, kdir / "modules", release)
            self.say(f"initramfs: {size / 1e6:.1f} MB")
            manifest = {
                "profile": self.name, "key": key, "kernel_package": kernel_package,
                "kernel_release": release, "rootfs_key": recipe.rootfs_key(self.profile),
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "requirements": recipe.guest_requirements().splitlines(), **extra,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            _replace_dir(tmp, final)
        self._register()
        # Not cache.get(): the recipe's inputs may have changed while this built (an edited agent).
        image = Image(self.name, key, final, release)
        for stale in self.cache.prune_stale(grace_s=_GRACE_S):
            self.say(f"removed stale {stale.name}")
        self.say(f"image {final.name} ready ({image.size_bytes() / 1e6:.0f} MB) in {final}")
        self.say(f"built in {time.monotonic() - t0:.0f} s; reused: {', '.join(self.reused) or 'nothing'}")
        return image

    def _write_rootfs(self, target: Path, force: bool) -> dict:
        """Put the root file system at ``target``; return what the manifest adds."""
        os.link(self._rootfs(force), target)
        return {}

    def _register(self) -> None:
        """Record what finds this image again (a course's recipe; nothing for a built-in profile)."""

    # -- parts

    def _resolve_kernel(self) -> tuple[str, str]:
        out = _run(["apt-cache", "depends", recipe.KERNEL_METAPACKAGE]).stdout
        names = [line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.strip().startswith("Depends:") and "linux-image-" in line]
        if not names:
            raise ImageBuildError(
                f"apt knows no {recipe.KERNEL_METAPACKAGE}; run `apt-get update` (the Debian "
                f"main archive must be in the apt sources)")
        pkg = names[0]
        policy = _run(["apt-cache", "policy", pkg]).stdout
        for line in policy.splitlines():
            if line.strip().startswith("Candidate:"):
                return pkg, line.split(":", 1)[1].strip()
        raise ImageBuildError(f"apt has no candidate version of {pkg}; run `apt-get update`")

    def _rootfs(self, force: bool, profile: recipe.Profile | None = None) -> Path:
        profile = profile or self.profile
        out = self.cache.parts_dir / rootfs_part_name(profile)
        if out.exists() and not force:
            self.say(f"root file system {out.name} cached")
            self.reused.append(f"root file system {out.name}")
            return out
        self.say(f"building the {profile.name} root file system with mmdebstrap "
                 f"({', '.join(profile.apt)})")
        with tempfile.TemporaryDirectory(prefix="smolvm-rootfs-") as tmp:
            req = Path(tmp) / "requirements.txt"
            req.write_text(recipe.guest_requirements())
            site = '"$1/usr/local/lib/python3.11/dist-packages"'
            pip = (f"{sys.executable} -m pip install --quiet --disable-pip-version-check "
                   f"--no-deps --no-compile --only-binary=:all: --platform manylinux2014_x86_64 "
                   f"--python-version 3.11 --implementation cp --target {site} -r {req}")
            hooks = [
                'chroot "$1" useradd --create-home --uid 1000 --user-group --shell /bin/sh user',
                pip,
                f'rm -rf {site}/bin {site}/share',
                # A read-only base never gets a chance to write .pyc files.
                'chroot "$1" python3 -m compileall -q -j0 /usr/lib/python3.11 '
                '/usr/lib/python3/dist-packages /usr/local/lib/python3.11/dist-packages >/dev/null || true',
                'rm -rf "$1"/var/log/* "$1"/var/cache/debconf/*-old "$1"/etc/machine-id',
            ]
            argv = ["mmdebstrap", "--variant=minbase", "--format=tar", "--verbose",
                    "--include=" + ",".join(profile.apt)]
            argv += [f"--dpkgopt=path-exclude={p}" for p in recipe.DPKG_EXCLUDES]
            argv += [f"--customize-hook={h}" for h in hooks]
            argv += [recipe.SUITE, "-", *recipe.MIRRORS]
            # Hidden: a concurrent build's prune_stale leaves names starting with "." alone.
            partial = out.parent / f".{out.name}.partial"
            try:
                self._pipe_to_squashfs(argv, partial)
                os.rename(partial, out)
            finally:
                partial.unlink(missing_ok=True)
        self.say(f"root file system: {out.stat().st_size / 1e6:.0f} MB")
        return out

    def _pipe_to_squashfs(self, argv: list[str], target: Path) -> None:
        sq_argv = ["tar2sqfs", "--quiet", "--force", "--compressor", "zstd", "--no-xattr", str(target)]
        mm = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=False)
        sq = subprocess.Popen(sq_argv, stdin=mm.stdout, stderr=subprocess.PIPE)
        mm.stdout.close()
        tail: list[str] = []
        for raw in mm.stderr:
            line = raw.decode(errors="replace").rstrip()
            tail = (tail + [line])[-40:]
            if line.startswith(("I: ", "E: ", "W: ")) and "running" not in line[:12]:
                self.say("  " + line)
        mm_rc = mm.wait()
        sq_err = sq.stderr.read().decode(errors="replace")
        sq_rc = sq.wait()
        if mm_rc != 0:
            raise CommandFailed(argv, mm_rc, "\n".join(tail),
                                hint="mmdebstrap needs network access to the Debian archive; a package apt "
                                     "cannot find is named in apt's message above")
        if sq_rc != 0:
            raise CommandFailed(sq_argv, sq_rc, sq_err)

    def _kernel(self, pkg: str, version: str) -> Path:
        kdir = self.cache.parts_dir / f"kernel-{pkg}-{version}"
        if (kdir / "release").exists():
            self.say(f"kernel {pkg} {version} cached")
            self.reused.append("kernel")
            return kdir
        self.say(f"fetching {pkg} {version}")
        with _staging(self.cache.parts_dir, ".kernel-") as tmp:
            deb = _apt_download(f"{pkg}={version}", tmp)
            tree = tmp / "tree"
            _run(["dpkg-deb", "-x", str(deb), str(tree)])
            vmlinuz = next((tree / "boot").glob("vmlinuz-*"))
            release = vmlinuz.name.removeprefix("vmlinuz-")
            shutil.copy(vmlinuz, tmp / "vmlinuz")
            (tmp / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
            mod_src = tree / "lib" / "modules" / release
            _copy_modules(mod_src, tmp / "modules")
            (tmp / "release").write_text(release + "\n")
            shutil.rmtree(tree)
            deb.unlink()
            _replace_dir(tmp, kdir)
        return kdir

    def _busybox(self) -> Path:
        out = self.cache.parts_dir / "busybox"
        if out.exists():
            return out
        self.say("fetching busybox-static")
        with tempfile.TemporaryDirectory(dir=self.cache.parts_dir) as tmp:
            deb = _apt_download(recipe.BUSYBOX_PACKAGE, Path(tmp))
            _run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "tree")])
            shutil.copy(Path(tmp) / "tree" / "bin" / "busybox", out.with_suffix(".partial"))
            os.rename(out.with_suffix(".partial"), out)
        return out


class CourseBuilder(ImageBuilder):
    """Build a course image: a base profile's root file system, apt.txt's packages, a pip layer.

    The Debian part is an ordinary cached root file system part (the base's,
    or one with apt.txt's packages added), so a changed requirements.txt
    rebuilds only the pip layer and the merge; pip's wheel cache lives under
    the parts folder, so unchanged wheels are not downloaded again."""

    def __init__(self, cache, course, progress: Callable[[str], None] | None = None) -> None:
        super().__init__(cache, course.rootfs_profile, progress)
        self.course = course

    @property
    def name(self) -> str:
        return self.course.name

    def key(self, kernel_package: str) -> str:
        return course_mod.course_key(self.course, kernel_package)

    def _register(self) -> None:
        course_mod.register(self.cache.root, self.course)

    def _write_rootfs(self, target: Path, force: bool) -> dict:
        c = self.course
        if c.apt:
            self.say(f"apt.txt adds {', '.join(c.apt)} to the {c.base} root file system")
        base_fs = self._rootfs(force)
        packages: dict[str, dict[str, str]] = {"pip": {}, "apt": {}}
        with tempfile.TemporaryDirectory(prefix=".layer-", dir=self.cache.parts_dir) as work:
            site = Path(work) / "site"
            site.mkdir()
            if course_mod.check_requirements(c.requirements):
                present = layer.base_python_packages(base_fs)
                # The kernel's pins, and every Python distribution the base already has at its
                # version: the course adds packages, it does not change the ones there.
                constraints = recipe.guest_requirements() + "".join(
                    f"{name}=={version}\n" for name, version in sorted(present.items())
                    if name not in _pinned_names())
                self.say("installing requirements.txt with pip (wheels for CPython 3.11, manylinux x86_64)")
                counts = layer.pip_install(c.requirements, site, self.cache.parts_dir / PIP_CACHE,
                                           Path(work), self.say, constraints)
                if counts["cached"]:
                    self.reused.append(f"{counts['cached']} downloaded wheels")
                dropped = layer.drop_present(site, present)
                if dropped:
                    self.say(f"  already in the {c.base} image, left out of the layer: {', '.join(dropped)}")
                packages["pip"] = {name: version for name, version, _ in layer.distributions(site)}
                layer.compile_layer(site, self.say)
            self.say(f"merging the layer onto {base_fs.name}")
            seen = layer.merge(base_fs, site, target)
        if c.apt:
            packages["apt"] = layer.parse_dpkg_status(
                seen.get("var/lib/dpkg/status", b"").decode(errors="replace"), c.apt)
        self.say(f"root file system: {target.stat().st_size / 1e6:.0f} MB "
                 f"({len(packages['pip'])} pip distributions, {len(packages['apt'])} apt packages)")
        return {"base": c.base, "packages": packages,
                "source": {"folder": c.folder, "files": list(c.files), "runtime": c.runtime or None},
                "course_requirements": c.requirements.splitlines(), "course_apt": list(c.apt)}


#: The course layers' downloaded wheels, under the parts folder (kept by prune_stale,
#: removed by `image prune`).
PIP_CACHE = "wheels"


def rootfs_part_name(profile: recipe.Profile) -> str:
    return f"rootfs-{profile.name}-{recipe.rootfs_key(profile)[:16]}.sqfs"


def _pinned_names() -> set[str]:
    names = set()
    for line in recipe.guest_requirements().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.sub(r"[-_.]+", "-", re.split(r"[=<>!~ \[]", line, 1)[0]).lower())
    return names


# ------------------------------------------------------------------ helpers

@contextlib.contextmanager
def _staging(parent: Path, prefix: str):
    """A temp dir beside the final place; removed if the step fails half-way."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished build into place (same file system: a rename)."""
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stderr)
    return proc


def _apt_download(spec: str, into: Path) -> Path:
    # apt drops privileges to _apt for downloads; a private temp dir is not
    # readable by it, which only produces a warning and a direct download.
    _run(["apt-get", "download", "-q", spec], cwd=into)
    debs = sorted(into.glob("*.deb"))
    if not debs:
        raise ImageBuildError(f"apt-get download {spec} produced no .deb")
    return debs[0]


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """Return the ELF kernel inside an LZ4-compressed bzImage (Debian's default)."""
    start = vmlinuz.find(_LZ4_LEGACY_MAGIC)
    while start != -1:
        proc = subprocess.run(["lz4", "-dc"], input=vmlinuz[start:], capture_output=True)
        # lz4 complains about the bzImage's trailing bytes; the ELF is still whole.
        if proc.stdout[:4] == b"\x7fELF":
            return proc.stdout
        start = vmlinuz.find(_LZ4_LEGACY_MAGIC, start + 1)
    raise ImageBuildError("no LZ4-compressed ELF kernel found inside vmlinuz")


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list from a module's .modinfo section."""
    idx = ko.find(b"\x00depends=")
    if idx == -1:
        return []
    end = ko.index(b"\x00", idx + 1)
    value = ko[idx + len(b"\x00depends="):end].decode()
    return [d for d in value.split(",") if d]


def _copy_modules(src: Path, dst: Path) -> None:
    """Copy recipe.MODULES and their dependencies; write the load order."""
    by_name = {p.stem.replace("-", "_"): p for p in src.rglob("*.ko")}
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        norm = name.replace("-", "_")
        if norm in order:
            return
        if norm not in by_name:
            raise ImageBuildError(f"kernel module {name} not found in {src}")
        if norm in chain:
            raise ImageBuildError(f"module dependency cycle: {' -> '.join(chain + (norm,))}")
        for dep in module_depends(by_name[norm].read_bytes()):
            visit(dep, chain + (norm,))
        order.append(norm)

    for name in recipe.MODULES:
        visit(name, ())
    dst.mkdir(parents=True)
    for name in order:
        shutil.copy(by_name[name], dst / f"{name}.ko")
    (dst / "order").write_text("\n".join(order) + "\n")


class _Cpio:
    """A minimal newc (SVR4, no CRC) archive writer: enough for an initramfs."""

    def __init__(self, fh) -> None:
        self.fh = fh
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\x00"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.fh.write(header + encoded + b"\x00" * (-(len(header) + len(encoded)) % 4))
        self.fh.write(data + b"\x00" * (-len(data) % 4))
        self.ino += 1

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def _write_initramfs(out: Path, busybox: Path, modules: Path, release: str) -> int:
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    with open(out, "wb") as fh:
        cpio = _Cpio(fh)
        for d in ("bin", "dev", "proc", "sys", "mnt", "newroot", "etc", "lib", "lib/modules",
                  "smolvm", "smolvm/smolvm_guest"):
            cpio.dir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in applets:
            if applet != "busybox":
                cpio.symlink(f"bin/{applet}", "busybox")
        order = (modules / "order").read_text().split()
        for name in order:
            cpio.file(f"lib/modules/{name}.ko", (modules / f"{name}.ko").read_bytes())
        cpio.file("etc/smolvm-modules", ("\n".join(order) + "\n").encode())
        cpio.file("etc/smolvm-release", (release + "\n").encode())
        sources = recipe.guest_sources()
        cpio.file("init", sources.pop("initramfs-init"), 0o755)
        for name, data in sources.items():
            cpio.file(f"smolvm/smolvm_guest/{name}", data)
        cpio.close()
    return out.stat().st_size
