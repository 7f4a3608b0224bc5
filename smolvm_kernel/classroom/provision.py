"""What the classroom needs on the host before the hub starts, made as root:
the students' Unix accounts, a Python they can run, the guest images and the
ready snapshots of their shape where they can read them, the hub's proxy.

deploy.py writes the settings around these and starts the hub; this is the
building, slow and done once (a venv and pip install, each profile's ready
snapshot built by booting a VM).
"""

from __future__ import annotations

import csv
import grp
import os
import pwd
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from smolvm_kernel.classroom.confine import GROUP
from smolvm_kernel.errors import SmolVMError

#: The built-in profiles' kernelspecs; a course image's is smolvm-<name> (kernelspec_name).
KERNELSPECS = {"base": "smolvm-python", "scipy": "smolvm-scipy"}


def kernelspec_name(profile: str) -> str:
    """The kernelspec a student picks for ``profile`` (the policy's profiles pick among them)."""
    return KERNELSPECS.get(profile) or f"smolvm-{profile}"


def find_proxy(install_dir: Path) -> str:
    """configurable-http-proxy: on PATH, or installed from npm into ``install_dir``."""
    found = shutil.which("configurable-http-proxy")
    if found:
        return found
    local = install_dir / "node_modules" / ".bin" / "configurable-http-proxy"
    if local.exists():
        return str(local)
    if not shutil.which("npm"):
        raise SmolVMError("JupyterHub needs configurable-http-proxy from npm, and npm is missing: "
                          "apt-get install nodejs npm")
    print(f"installing configurable-http-proxy from npm into {install_dir}", flush=True)
    install_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["npm", "install", "--prefix", str(install_dir), "--no-audit", "--no-fund",
                           "--loglevel=error", "configurable-http-proxy@4"], capture_output=True, text=True)
    if proc.returncode != 0 or not local.exists():
        raise SmolVMError(f"npm could not install configurable-http-proxy: {proc.stderr.strip()[-500:]}")
    return str(local)


def blocked_for_students(path: Path) -> str | None:
    """Which folder above ``path`` students cannot enter, if any."""
    for p in [path, *path.parents]:
        if p.exists() and not os.stat(p).st_mode & 0o001:
            return str(p)
    return None


def students_python(folder: Path, profiles: list[str]) -> Path:
    """The bin folder of a Python environment students' processes can run: this
    one if they can reach it, else ``folder/venv`` made from the system's
    python3 with this package installed (a venv made from a Python under
    /root, as pyenv's, is out of their reach)."""
    here = Path(sys.executable)
    if not blocked_for_students(here.resolve()) and not blocked_for_students(Path(sys.prefix)):
        return here.parent
    venv = folder / "venv"
    py = venv / "bin" / "python"
    if not (venv / "bin" / "jupyterhub-singleuser").exists():
        base = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
        if base is None or blocked_for_students(Path(base).resolve()):
            raise SmolVMError(f"students cannot run this Python ({here.resolve()}) and there is no system "
                              f"python3 they can: apt-get install python3-venv")
        print(f"making a Python environment students can run, in {venv} (a minute)", flush=True)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        src = Path(__file__).resolve().parents[2]
        from smolvm_kernel._version import __version__
        target = f"{src}[classroom]" if (src / "pyproject.toml").exists() else f"smolvm-kernel[classroom]=={__version__}"
        proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", target],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SmolVMError(f"installing smolvm-kernel for the students failed: {proc.stderr.strip()[-800:]}")
    for profile in profiles:
        name = kernelspec_name(profile)
        if name:
            subprocess.run([str(py), "-I", "-c", "import sys; from smolvm_kernel.jupyter import kernelspec; "
                            f"kernelspec.install({name!r}, prefix=sys.prefix, "
                            f"profile={None if profile == 'base' else profile!r})"],
                           check=True, capture_output=True, env={**os.environ, "SMOLVM_POLICY_FILE": "/nonexistent",
                                                                 **_cache_env(folder)})
    for root, dirs, files in os.walk(venv):
        os.chmod(root, 0o755)
    return venv / "bin"


def share_cache(dest: Path, profiles: list[str]) -> None:
    """Copy this host's images where students can read them (the snapshots of
    their shape are built there next: build_shared_snapshots). An image not
    built yet is built first (a course image from the recipe recorded when it
    was first built: `smolvm-kernel image build --profile NAME --from FOLDER`)."""
    from smolvm_kernel.backends.base import copy_sparse
    from smolvm_kernel.images import ImageCache
    from smolvm_kernel.images.course import courses_dir

    images = ImageCache()
    for sub in ("images", "snapshots", "courses"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for profile in profiles:
        image = images.ensure(profile, progress=lambda m: print(f"[{profile}] {m}", flush=True))
        recipe_json = courses_dir(images.root) / f"{profile}.json"
        if recipe_json.exists():
            # The students' kernels find a course image by its recipe.
            shutil.copy(recipe_json, dest / "courses" / recipe_json.name)
        src = image.directory
        target = dest / "images" / src.name
        if not target.exists():
            shutil.copytree(src, target, copy_function=lambda a, b: copy_sparse(Path(a), Path(b)))
    _readable_by_all(dest)


def _cache_env(folder: Path) -> dict[str, str]:
    """The shared cache, where a course profile is registered, when it exists."""
    return {"SMOLVM_CACHE_DIR": str(folder / "cache")} if (folder / "cache" / "courses").is_dir() else {}


def _readable_by_all(tree: Path) -> None:
    """Root's, readable by everyone, writable by root alone: folders 755, files 644."""
    for root, dirs, files in os.walk(tree):
        os.chown(root, 0, 0)
        os.chmod(root, 0o755)
        for f in files:
            os.chown(os.path.join(root, f), 0, 0)
            os.chmod(os.path.join(root, f), 0o644)


_SNAPSHOT_SCRIPT = """
import sys
from smolvm_kernel.config import SandboxConfig
from smolvm_kernel.vm.sandbox import Sandbox
cfg = SandboxConfig().validated()        # the shape a student gets under the policy
shape = dict(vcpus=cfg.vcpus, mem_mib=cfg.mem_mib, disk_mib=cfg.disk_mib)
import os
os.environ["SMOLVM_POLICY_FILE"] = "/nonexistent"   # built by root, outside the students' quotas
sb = Sandbox(profile=sys.argv[1], snapshot="wait", **shape,
             progress=lambda m: print(f"[{sys.argv[1]}] {m}", flush=True))
try:
    sb.start()
finally:
    sb.stop()
"""


def build_shared_snapshots(cache: Path, profiles: list[str], policy_path: Path) -> None:
    """The ready snapshot of the shape students get (their caps), built once by
    root into the shared cache, where their kernels copy it from."""
    env = {**os.environ, "SMOLVM_CACHE_DIR": str(cache), "SMOLVM_POLICY_FILE": str(policy_path),
           "SMOLVM_STATE_DIR": str(cache.parent / "root-state")}
    env.pop("SMOLVM_SNAPSHOT_DIR", None)
    for profile in profiles:
        proc = subprocess.run([sys.executable, "-I", "-c", _SNAPSHOT_SCRIPT, profile], env=env,
                              cwd=cache.parent, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SmolVMError(f"building the students' {profile} snapshot failed: {proc.stderr.strip()[-800:]}")
    shutil.rmtree(cache.parent / "root-state", ignore_errors=True)
    _readable_by_all(cache)


def create_students(n: int, prefix: str, folder: Path) -> list[tuple[str, str]]:
    """Unix accounts for ``n`` students (in the class group, home folders private),
    with random passwords listed in ``folder/students.csv`` (root only)."""
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", GROUP], check=True)
    extra_groups = [GROUP] + (["kvm"] if _group_exists("kvm") else [])
    out = []
    for i in range(1, n + 1):
        name = f"{prefix}{i}"
        password = secrets.token_urlsafe(12)
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--shell", "/usr/sbin/nologin",
                            "--groups", ",".join(extra_groups), name], check=True)
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
        os.chmod(pwd.getpwnam(name).pw_dir, 0o700)
        out.append((name, password))
    path = folder / "students.csv"
    known = {}
    if path.exists():
        with open(path) as fh:
            known = {row[0]: row[1] for row in csv.reader(fh) if len(row) == 2}
    known.update(dict(out))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", newline="") as fh:
        csv.writer(fh).writerows(sorted(known.items()))
    return out


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def read_students(folder: Path) -> list[tuple[str, str]]:
    with open(folder / "students.csv") as fh:
        return [(row[0], row[1]) for row in csv.reader(fh) if len(row) == 2]
