"""smolvm-kernel: set up, build images, list and clean up VMs, diagnose, demo."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from smolvm_kernel._version import __version__
from smolvm_kernel.errors import SmolVMError


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def cmd_image_build(args) -> int:
    from smolvm_kernel.images import ImageCache
    from smolvm_kernel.vm.snapshot import SnapshotCache

    cache = ImageCache()
    if args.from_folder:
        from smolvm_kernel.images.course import read_folder

        if len(args.profile) != 1:
            print("smolvm-kernel: --from builds one course image: give one --profile NAME", file=sys.stderr)
            return 2
        course = read_folder(Path(args.from_folder), args.profile[0], args.base)
        print(f"[{course.name}] course folder {course.folder}: read {', '.join(course.files)}", flush=True)
        image = cache.build_course(course, force=args.force)
        print(f"{image.profile}: {image.directory}")
        _print_packages(image)
        return 0
    if args.base != "base":
        print("smolvm-kernel: --base is the base of a course image; use it with --from FOLDER", file=sys.stderr)
        return 2
    for profile in args.profile:
        image = cache.build(profile, force=args.force)
        print(f"{image.profile}: {image.directory}")
        if args.force:
            # Same recipe, same key, new bytes: a snapshot's saved page cache
            # would no longer match the root file system.
            snaps = SnapshotCache()
            for snap in snaps.list():
                if snap.manifest().get("image") == image.key:
                    snaps.drop(snap, "its image was rebuilt")
        if not args.no_snapshot:
            _prepare_snapshot(profile, boot_anyway=False)
    return 0


def _packages(image) -> str:
    """A course image's added packages, from its manifest ('-' for a built-in profile)."""
    from smolvm_kernel.images.recipe import read_manifest

    pkgs = (read_manifest(image.directory) or {}).get("packages")
    if not pkgs:
        return "-"
    return " ".join([f"{n}=={v}" for n, v in sorted(pkgs.get("pip", {}).items())]
                    + [f"{n}={v}(apt)" for n, v in sorted(pkgs.get("apt", {}).items())]) or "-"


def _print_packages(image) -> None:
    from smolvm_kernel.images.recipe import read_manifest

    manifest = read_manifest(image.directory) or {}
    if "packages" in manifest:
        base = manifest.get("base")
        print(f"packages added to {base}: {_packages(image)}")


def cmd_image_ls(args) -> int:
    from smolvm_kernel.images import ImageCache
    from smolvm_kernel.images.recipe import read_manifest

    images = ImageCache().list()
    if images:
        rows = []
        for i in images:
            m = read_manifest(i.directory) or {}
            row = [i.profile, m.get("base", "-"), i.key[:16], i.kernel_release, f"{i.size_bytes() / 1e6:.0f} MB"]
            pkgs = _packages(i)
            if not args.packages and len(pkgs) > 60:
                pkgs = pkgs[:57] + "..."
            rows.append(row + [pkgs, str(i.directory)])
        _print_table(rows, ["PROFILE", "BASE", "HASH", "KERNEL", "SIZE", "PACKAGES", "PATH"])
    else:
        print("no images; build one with `smolvm-kernel image build`")
    from smolvm_kernel.vm.snapshot import SNAPSHOT_FORMAT, SnapshotCache

    current = {i.key for i in images}
    rows = []
    for snap in SnapshotCache().list():
        m = snap.manifest()
        shape = m.get("shape", {})
        stale = m.get("image") not in current or m.get("format") != SNAPSHOT_FORMAT
        rows.append([m.get("profile", "?"), f"{shape.get('vcpus')} vCPU / {shape.get('mem_mib')} MiB / "
                     f"{shape.get('disk_mib')} MiB disk / {shape.get('accel')}",
                     f"{m.get('state_bytes', 0) / 2**10:.0f} KiB + {m.get('ram_file_bytes', 0) / 2**20:.0f} MiB RAM",
                     "stale (pruned at the next start)" if stale else "ready", str(snap.directory)])
    if rows:
        print("\nready snapshots:")
        _print_table(rows, ["PROFILE", "SHAPE", "SIZE", "STATE", "PATH"])
    return 0


def _inodes(root: Path) -> dict[tuple[int, int], int]:
    """Every inode under ``root`` and the bytes it holds: images hard-link their parts,
    so what a removal frees is what no longer has a name here."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            out[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return out


def _freed(before: dict[tuple[int, int], int], root: Path) -> str:
    after = _inodes(root) if root.exists() else {}
    return f"freed {sum(size for ino, size in before.items() if ino not in after) / 1e6:.0f} MB"


def cmd_image_rm(args) -> int:
    from smolvm_kernel.images import ImageCache

    cache = ImageCache()
    before = _inodes(cache.root)
    removed = cache.remove(args.target)
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print(f"nothing matches {args.target!r}", file=sys.stderr)
        return 1
    print(_freed(before, cache.root))
    return 0


def cmd_image_prune(args) -> int:
    from smolvm_kernel.images import ImageCache

    cache = ImageCache()
    if not cache.root.exists():
        print("nothing to prune")
        return 0
    before = _inodes(cache.root)
    removed = cache.prune_stale(pip_cache=True)
    for path in removed:
        print(f"removed {path}")
    print(f"removed {len(removed)} stale images and parts (pip's wheel cache included); "
          f"{_freed(before, cache.root)}")
    return 0


def cmd_ls(args) -> int:
    from smolvm_kernel.host.registry import Registry

    if args.all:
        return _ls_host(args.socket)
    recs = Registry().list()
    if not recs:
        print("no VMs")
        return 0
    now = time.time()
    _print_table([[r.vm_id, r.backend, r.accel, r.profile, str(r.vmm_pid or "-"),
                   f"{r.vcpus}/{r.mem_mib}M", str(r.owner_pid),
                   "alive" if r.owner_alive else "DEAD", f"{now - r.created:.0f}s"] for r in recs],
                 ["VM", "BACKEND", "ACCEL", "PROFILE", "PID", "CPU/MEM", "OWNER", "OWNER STATE", "AGE"])
    return 0


def _ls_host(socket_path: str | None) -> int:
    """Every VM the host's admission service has granted, by user (root sees all)."""
    from smolvm_kernel.host import policy
    from smolvm_kernel.host.admission import SOCKET_PATH, HostClient

    pol = policy.load()
    path = socket_path or (pol.hostd if pol and pol.hostd else SOCKET_PATH)
    client = HostClient(path)
    try:
        grants = client.list()
    finally:
        client.close()
    if not grants:
        print("no VMs granted")
        return 0
    now = time.time()

    def since(g) -> str:
        try:
            return f"{now - float(g['since']):.0f}s"
        except (KeyError, TypeError, ValueError):
            return "-"

    # Every cell may have come from a user (a kernel id, a VM id, a name): escaped.
    rows = [[_escape(g.get(k)) for k in ("user", "uid", "id", "vm_id", "state", "kernel_id")]
            + [f"{_escape(g.get('vcpus'))}/{_escape(g.get('mem_mib'))}M", since(g)]
            for g in grants if isinstance(g, dict)]
    _print_table(sorted(rows, key=lambda r: (r[0], r[2].zfill(20))),
                 ["USER", "UID", "GRANT", "VM", "STATE", "KERNEL", "CPU/MEM", "AGE"])
    return 0


def _escape(value, limit: int = 80) -> str:
    """A value for one cell of a terminal table: control characters (ANSI
    escapes, newlines, bidi overrides) shown as escapes, cut at ``limit``; "-" if empty."""
    text = "" if value is None else str(value)
    out = "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
                  for c in text)
    if len(out) > limit:
        out = out[:limit - 1] + "…"
    return out or "-"


def cmd_hostd(args) -> int:
    from smolvm_kernel.classroom import hostd
    from smolvm_kernel.host.admission import SOCKET_PATH

    return hostd.serve(args.socket or SOCKET_PATH)


def cmd_admission(args) -> int:
    """One line: "ok", or "refused: <why>" (exit 1), for a VM of the shape a kernel
    here would get (this host's policy and SMOLVM_* settings)."""
    from smolvm_kernel.config import SandboxConfig
    from smolvm_kernel.host.admission import admission_answer

    answer = admission_answer(SandboxConfig().validated())
    print(answer)
    return 0 if answer.startswith("ok") else 1


def cmd_classroom(args) -> int:
    from smolvm_kernel.classroom import deploy as classroom

    folder = Path(args.dir or classroom.DEFAULT_DIR)
    if args.action in ("up", "setup"):
        hub = classroom.setup(folder, args.students, port=args.port, prefix=args.prefix,
                              cull_idle_timeout=args.cull_idle_timeout, student_mem_mib=args.student_mem_mib,
                              student_cpus=args.student_cpus, student_tasks=args.student_tasks,
                              profiles=args.profile)
        print(f"classroom written to {folder} (hub config {hub.name}); student accounts and passwords "
              f"in {folder / 'students.csv'} (root only)")
    if args.action in ("up", "run"):
        print(f"JupyterHub on http://127.0.0.1:{args.port}/ (Ctrl-C stops it)", flush=True)
        return classroom.run(folder)
    if args.action == "confine":
        from smolvm_kernel.classroom import confine
        return confine.serve(confine.StudentLimits.of(args.student_mem_mib, args.student_cpus,
                                                      args.student_tasks))
    if args.action == "down":
        removed = classroom.down(folder)
        print(f"removed {len(removed)} student accounts: {' '.join(removed) or '-'}")
    return 0


def cmd_cleanup(args) -> int:
    from smolvm_kernel.host.registry import Registry

    from smolvm_kernel.vm.checkpoints import CheckpointStore

    lines = Registry().cleanup(everything=args.all)
    lines += [f"removed {path.name}: a half-written checkpoint, or an undo step of a kernel that is gone"
              for path in CheckpointStore().cleanup()]
    for line in lines:
        print(line)
    if not lines:
        print("nothing to clean up")
    return 0


def cmd_doctor(args) -> int:
    if getattr(args, "hosts", None):
        from smolvm_kernel.remote.doctor import doctor_hosts
        return doctor_hosts([h for h in args.hosts.split(",") if h], args.user)
    if getattr(args, "json", False):
        import json

        from smolvm_kernel.remote.doctor import summary
        print(json.dumps(summary()))
        return 0
    from smolvm_kernel.backends.accel import choose_accel, host_tsc_khz
    from smolvm_kernel.config import SandboxConfig
    from smolvm_kernel.images import ImageCache

    cfg = SandboxConfig()
    ok = True

    def line(label: str, value: str, good: bool = True) -> None:
        nonlocal ok
        ok = ok and good
        print(f"{'ok ' if good else 'BAD'}  {label:<14} {value}")

    line("smolvm-kernel", __version__)
    line("python", f"{sys.version.split()[0]} ({sys.executable})")
    line("host", f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} cores")
    qemu = shutil.which(cfg.qemu_path)
    if qemu:
        ver = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        line("qemu", f"{qemu}: {ver}")
    else:
        line("qemu", "not found; install qemu-system-x86 (Debian) or qemu (Homebrew)", False)
    from smolvm_kernel.backends.firecracker import firecracker_available
    fc_ok, fc_why = firecracker_available(cfg.firecracker_path)
    line("firecracker", "usable" if fc_ok else f"not usable: {fc_why}")
    images = ImageCache().list()
    if images:
        for image in images:
            line("image", f"{image.profile} {image.key[:16]} kernel {image.kernel_release} "
                          f"({image.size_bytes() / 1e6:.0f} MB)")
    else:
        line("image", "none built; run `smolvm-kernel image build`", False)
    backend = "firecracker" if (cfg.backend == "firecracker" or (cfg.backend == "auto" and fc_ok)) else "qemu"
    line("backend", f"{backend} (configured: {cfg.backend})")
    if qemu and images and backend == "qemu":
        try:
            choice = choose_accel(cfg.accel, qemu, images[0])
            line("accelerator", f"{choice.name}: {choice.reason}")
            if getattr(args, "verbose", False) and choice.detail:
                line("", f"probe: {choice.detail}")
        except SmolVMError as exc:
            line("accelerator", str(exc), False)
    from smolvm_kernel.vm.snapshot import SnapshotCache

    snaps = [d for d in SnapshotCache().root.glob("*") if not d.name.startswith(".")] \
        if SnapshotCache().root.is_dir() else []
    line("snapshots", f"{len(snaps)} ready" + (f": {', '.join(d.name for d in snaps)}" if snaps else
                                               " (the first start of each VM shape builds one)"))
    try:
        ksm = open("/sys/kernel/mm/ksm/run").read().strip() == "1"
        line("ksm", "on: pages the VMs write are merged too" if ksm else
             "off: forks share their snapshot's RAM file; `echo 1 > /sys/kernel/mm/ksm/run` (root) "
             "would also merge identical pages they write")
    except OSError:
        pass
    from smolvm_kernel.host import cgroups

    where = cgroups.probe()
    # Not a fault: VMs still run, only without host limits of their own.
    line("cgroups", f"each VMM in its own ({where.describe()}); a {cfg.mem_mib} MiB VM's VMM may use "
                    f"{cfg.mem_mib + cfg.vmm_overhead_mib} MiB" if not isinstance(where, str) else
         f"none: {where}; VMMs run without memory/CPU/pids limits of their own")
    from smolvm_kernel.host.net import NetworkError, check_host
    from smolvm_kernel.vm.boot import qemu_vsock_available

    line("transport", "vsock (/dev/vhost-vsock)" if qemu_vsock_available() and backend == "qemu" else
         ("vsock" if backend == "firecracker" else "virtio-serial (no /dev/vhost-vsock)")
         + f"; configured: {cfg.transport}")
    try:
        check_host()
        line("network", f"nat available (TAP + nftables); default network={cfg.network}")
    except (NetworkError, SmolVMError) as exc:
        # Not a fault: the default needs no network.
        line("network", f"network='nat' unavailable: {str(exc).split(':')[0]}; default network={cfg.network}")
    tsc = host_tsc_khz()
    line("host tsc", f"{tsc} kHz (passed to TCG guests)" if tsc else "unknown (no constant_tsc)")
    for tool in ("mmdebstrap", "tar2sqfs", "mkfs.ext4", "lz4"):
        path = shutil.which(tool)
        line(tool, path or "missing (needed to build images / scratch disks)", bool(path))
    return 0 if ok else 1


def cmd_setup(args) -> int:
    """Build the image(s), register a kernelspec per profile, then run doctor."""
    from smolvm_kernel.images import ImageCache
    from smolvm_kernel.jupyter import kernelspec

    _compile_own_modules()
    cache = ImageCache()
    in_venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
    for profile in args.profile:
        cache.ensure(profile)
        name = "smolvm-python" if profile == "base" else f"smolvm-{profile}"
        path = kernelspec.install(name, prefix=sys.prefix if in_venv else None,
                                  user=not in_venv, profile=None if profile == "base" else profile)
        print(f"kernelspec {name}: {path}")
        _prepare_snapshot(profile)
    return cmd_doctor(args)


def _compile_own_modules() -> None:
    """Byte-compile this package (and the guest's, which the host imports).

    An editable install leaves no .pyc until a first import writes one, and
    not even then under PYTHONDONTWRITEBYTECODE: every kernel launch would
    then compile ~5000 lines (~20 ms) before answering its frontend.
    """
    import compileall
    import importlib.util

    guest = importlib.util.find_spec("smolvm_guest")      # its folder, without importing it
    for package in (Path(__file__).parent, Path(guest.origin).parent):
        compileall.compile_dir(str(package), quiet=1)


def _prepare_snapshot(profile: str, boot_anyway: bool = True) -> None:
    """Boot the default VM shape once so its ready snapshot exists (or is reused).

    A configuration that never restores (a NIC, SSH or vsock, Firecracker)
    boots only with ``boot_anyway`` (setup's check that a VM starts).
    """
    from smolvm_kernel.config import SandboxConfig
    from smolvm_kernel.vm.sandbox import Sandbox

    cfg = SandboxConfig()
    if cfg.snapshot == "off":
        return
    if not boot_anyway and (cfg.network != "none" or cfg.transport in ("ssh", "vsock")
                            or cfg.backend == "firecracker"):
        print(f"[{profile}] no ready snapshot for network={cfg.network}, transport={cfg.transport}, "
              f"backend={cfg.backend}: such VMs cold-boot")
        return
    # "wait": build the snapshot now and restore it (the default, "auto", would
    # cold-boot and build it in the background, which this stop would end).
    sb = Sandbox(profile=profile, snapshot="wait", progress=lambda m: print(f"[{profile}] {m}", flush=True))
    try:
        sb.start()
    finally:
        sb.stop()


def cmd_install(args) -> int:
    from smolvm_kernel.jupyter import kernelspec

    prefix = sys.prefix if args.sys_prefix else args.prefix
    from smolvm_kernel.config.options import KERNELSPEC_OPTIONS

    path = kernelspec.install(args.name, args.display_name, user=args.user, prefix=prefix,
                              gateway_hosts=[h for h in (args.gateway or "").split(",") if h] or None,
                              **{option: getattr(args, option) for option in KERNELSPEC_OPTIONS})
    print(f"installed kernelspec {args.name} in {path}")
    return 0


def cmd_demo(args) -> int:
    from smolvm_kernel.jupyter.demo import main as demo_main

    return demo_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smolvm-kernel", description=__doc__)
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("setup", help="build the guest image and check the host")
    s.add_argument("--profile", action="append", default=None, help="image profile(s); default: base")
    s.set_defaults(func=cmd_setup)

    img = sub.add_parser("image", help="build, list or remove guest images")
    isub = img.add_subparsers(dest="image_command", required=True)
    b = isub.add_parser("build", help="build a guest image (cached by content hash)")
    b.add_argument("--profile", action="append", default=None,
                   help="base (default) or scipy; with --from, the new course image's name (e.g. ds101)")
    b.add_argument("--from", dest="from_folder", metavar="FOLDER",
                   help="build a course image from FOLDER's requirements.txt and apt.txt (as Binder reads "
                        "them; runtime.txt may say python-3.11; environment.yml, postBuild, start and "
                        "Dockerfile are refused)")
    b.add_argument("--base", default="base", choices=["base", "scipy"],
                   help="with --from: the profile the course image adds to (default base)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--no-snapshot", action="store_true",
                   help="skip the ready snapshot of the default VM shape (made on first start then)")
    b.set_defaults(func=cmd_image_build)
    ls_img = isub.add_parser("ls", help="list built images (a course image with the packages it adds)")
    ls_img.add_argument("--packages", action="store_true", help="list every added package, untruncated")
    ls_img.set_defaults(func=cmd_image_ls)
    isub.add_parser("prune", help="remove stale images and parts, and pip's wheel cache; "
                                  "print the space freed").set_defaults(func=cmd_image_prune)
    r = isub.add_parser("rm", help="remove images by profile, hash prefix, or 'all' (a course image's "
                                   "name unregisters it too)")
    r.add_argument("target")
    r.set_defaults(func=cmd_image_rm)

    inst = sub.add_parser("install", help="register the SmolVM Python kernelspec")
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="in the user's Jupyter data dir")
    where.add_argument("--sys-prefix", action="store_true", help="in this Python's prefix (venv)")
    where.add_argument("--prefix", help="under PREFIX/share/jupyter/kernels")
    inst.add_argument("--name", default="smolvm-python")
    inst.add_argument("--display-name")
    from smolvm_kernel.config.options import KERNELSPEC_OPTIONS

    # The settings a kernelspec can carry, as the settings table declares them.
    for option, o in KERNELSPEC_OPTIONS.items():
        inst.add_argument(f"--{option.replace('_', '-')}", dest=option, choices=o.choices,
                          type={"int": int, "float": float}.get(o.kind, str),
                          metavar=None if o.choices else (o.metavar or None),
                          help=f"{o.help} (setting {o.name})".replace("%", "%%"))
    inst.add_argument("--gateway", metavar="HOST[,HOST...]",
                      help="a kernelspec for a Jupyter gateway's DistributedProvisioner (gateway_provisioners), "
                           "which starts the SmolVM kernel on one of these hosts over SSH (see README)")
    inst.set_defaults(func=cmd_install, profile_given=True)

    ls = sub.add_parser("ls", help="list live VMs")
    ls.add_argument("--all", action="store_true",
                    help="every user's VMs on this host, from its admission service (root sees all)")
    ls.add_argument("--socket", help="the admission service's socket (default: the policy's hostd)")
    ls.set_defaults(func=cmd_ls)
    hd = sub.add_parser("hostd", help="run the host's admission service (quotas, budget, audit log; as root)")
    hd.add_argument("--socket", help="where to listen (default /run/smolvm/hostd.sock)")
    hd.set_defaults(func=cmd_hostd)
    ad = sub.add_parser("admission", help="whether this host would start a VM of the default shape now "
                                          "(its policy and admission service; for placement across hosts)")
    ad.set_defaults(func=cmd_admission)
    cr = sub.add_parser("classroom", help="JupyterHub with one microVM per student (as root; see README)")
    cr.add_argument("action", choices=["up", "setup", "run", "down", "confine"],
                    help="up = setup then run; setup writes the deployment and creates the students; "
                         "run starts the hub; down removes the students it created; confine keeps every "
                         "student process in its student's cgroup (the hub runs it)")
    cr.add_argument("--dir", default=None, help="the deployment's folder (default /var/lib/smolvm-classroom)")
    cr.add_argument("--students", type=int, default=3, help="how many student accounts to create")
    cr.add_argument("--profile", action="append", default=None,
                    help="an image to offer (repeatable; e.g. a course image built with `image build --from`); "
                         "default: the policy's profiles")
    cr.add_argument("--prefix", default="student", help="student account names: <prefix>1, <prefix>2, ...")
    cr.add_argument("--port", type=int, default=8000, help="the hub's port on 127.0.0.1")
    cr.add_argument("--cull-idle-timeout", type=int, default=3600,
                    help="seconds before Jupyter Server shuts an idle kernel (and its VM) down")
    cr.add_argument("--student-mem-mib", type=int, default=None,
                    help="memory for all of a student's host processes, VMMs apart (default 1024)")
    cr.add_argument("--student-cpus", type=float, default=None, help="their CPU cores (default 1)")
    cr.add_argument("--student-tasks", type=int, default=None, help="their processes and threads (default 512)")
    cr.set_defaults(func=cmd_classroom, profile_given=True)
    c = sub.add_parser("cleanup", help="kill VMs whose owner died and remove their files (and checkpoints half "
                                       "written, and undo steps of kernels that are gone)")
    c.add_argument("--all", action="store_true", help="also VMs whose owner is alive")
    c.set_defaults(func=cmd_cleanup)
    doctor = sub.add_parser("doctor", help="show backend, accelerator and why, images, versions")
    doctor.add_argument("-v", "--verbose", action="store_true",
                        help="also the accelerator probe's raw evidence (e.g. QEMU's error)")
    doctor.add_argument("--hosts", metavar="H1,H2", help="check each of a gateway's hosts over SSH, a line each "
                                                         "(pinned host keys; the key in ~/.ssh)")
    doctor.add_argument("--user", help="with --hosts: the SSH user (default: yours)")
    doctor.add_argument("--json", action="store_true", help="this host's facts for doctor --hosts, as JSON")
    doctor.set_defaults(func=cmd_doctor)
    d = sub.add_parser("demo", help="execute the demo notebook in a microVM and show the results")
    d.add_argument("rest", nargs=argparse.REMAINDER)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "profile", "x") is None and not getattr(args, "profile_given", False):
        args.profile = ["base"]
    try:
        return args.func(args)
    except SmolVMError as exc:
        print(f"smolvm-kernel: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
