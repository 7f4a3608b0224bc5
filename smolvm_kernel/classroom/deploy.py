"""The classroom deployment: JupyterHub on one host, one Unix user per student,
JupyterLab as each student's server, SmolVM kernels the only way code runs.

``smolvm-kernel classroom up`` (as root) writes everything into one folder
and starts the hub; ``setup`` only writes, ``run`` only starts, ``down``
removes the students it created. What it writes:

- ``policy.toml``: the instructor's policy (policy.py), unless one exists at
  ``/etc/smolvm/policy.toml`` (which then rules, and is left alone).
- ``jupyter/``: the students' Jupyter configuration, root-owned; the
  spawner points ``JUPYTER_CONFIG_DIR`` at it so nothing in a student's home
  is read as configuration. Only the SmolVM kernelspecs, no terminals, no
  hidden files through the contents API, idle kernels culled.
- ``cache/``: the guest images and ready snapshots, readable by students,
  writable by root alone (students fork from copies of the snapshots' state and
  disk; their guest RAM is one sealed memfd per snapshot that hostd hands out:
  sharedram.py).
- ``server-cwd/``, ``jupyter-data/``: empty, root-owned: the servers' working
  directory and ``JUPYTER_DATA_DIR``, so nothing that searches either (nbconvert's
  templates, kernelspecs, lab extensions) finds a student's file.
- ``jupyterhub_config.py``: PAM login of the students' Unix accounts,
  ClassroomSpawner (LocalProcessSpawner with a root-made cgroup per student:
  confine.py), the hub on loopback, and as hub-managed services
  ``smolvm-kernel hostd`` (quotas, budget, audit log: hostd.py) and
  ``smolvm-kernel classroom confine`` (moves any stray process of a student
  into their cgroup).
- ``students.csv``: the accounts created and their passwords (root only).

The slow building (the accounts, a Python students can run, the images and
snapshots, the proxy) is provision.py's. This module writes the settings
around it, runs the hub and takes it down, and holds the classes those
settings name, which run in the hub and in each student's server
(``smolvm_kernel.classroom.deploy.ClassroomSpawner`` and the others: the
hub configurations already written name them there).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

from smolvm_kernel.classroom.confine import DEFAULT_CPUS, DEFAULT_MEM_MIB, DEFAULT_TASKS, GROUP
from smolvm_kernel.classroom.provision import (blocked_for_students, build_shared_snapshots, create_students,
                                               find_proxy, kernelspec_name, read_students, share_cache,
                                               students_python)
from smolvm_kernel.errors import SmolVMError

DEFAULT_DIR = "/var/lib/smolvm-classroom"

DEFAULT_POLICY = """\
# The instructor's policy for this classroom (see smolvm_kernel/policy.py).
max_vcpus = 1
max_mem_mib = 512
max_disk_mib = 2048
max_exec_timeout = 300
network = ["none"]                 # exam mode: no network, and students cannot turn it on
profiles = ["base", "scipy"]
output_policy = "safe"
max_output_mib = 16
pause_after = 600                  # idle VMs go to disk after 10 minutes
max_vms_per_user = 2
max_mem_mib_per_user = 1024
host_max_vms = {host_max_vms}
host_reserve_mib = 2048
hostd = "{hostd}"
audit_log = "{audit}"
"""

STUDENT_SERVER_CONFIG = """\
# Written by smolvm-kernel classroom: the students' Jupyter Server settings.
# Student code runs only in microVMs: nothing here may run it on the host.
import os
c.ServerApp.kernel_spec_manager_class = "smolvm_kernel.classroom.deploy.ClassroomKernelSpecManager"
c.KernelSpecManager.allowed_kernelspecs = {kernelspecs!r}
c.KernelSpecManager.ensure_native_kernel = False      # no host Python kernel
c.ServerApp.terminals_enabled = False                 # a terminal is a host shell
c.ContentsManager.allow_hidden = False                # no ~/.jupyter, ~/.local uploads
c.ServerApp.kernel_manager_class = "smolvm_kernel.classroom.deploy.CullingKernelManager"
c.MappingKernelManager.cull_idle_timeout = {cull}
c.MappingKernelManager.cull_interval = {cull_interval}
c.MappingKernelManager.cull_connected = True          # a forgotten open tab is idle too
# The notebooks are the home; the process runs in a root-owned folder (the
# spawner's), so nothing that searches the working directory finds a student's file.
c.ServerApp.root_dir = os.path.expanduser("~")
# nbconvert's templates (unsandboxed Jinja) and their conf.json (which names
# preprocessor classes to import) are searched in the working directory and in
# the Jupyter data folders: only the installed ones, never the student's.
c.TemplateExporter.extra_template_basedirs = []
c.TemplateExporter.extra_template_paths = []
# JUPYTER_DATA_DIR is root's (see the hub's config): the notebook-trust database
# (which outputs the browser may show unsanitized) stays the student's own.
c.NotebookNotary.data_dir = os.path.expanduser("~/.local/share/jupyter")
# JupyterLab's extension manager would pip-install into the server's Python.
c.LabApp.extension_manager = "readonly"
# Language servers would run on the host over the student's files (and read
# their project configuration, some of which loads plugins).
c.ServerApp.jpserver_extensions = {{"jupyter_lsp": False}}
"""

HUB_CONFIG = """\
# Written by smolvm-kernel classroom: JupyterHub for one host.
import os
c = get_config()  # noqa: F821
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.db_url = "sqlite:///{dir}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{dir}/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = "{dir}/jupyterhub.pid"
c.ConfigurableHTTPProxy.command = [{chp!r}]
c.ConfigurableHTTPProxy.pid_file = "{dir}/proxy.pid"
# Students log in with their Unix accounts (PAM); only the class's group may.
c.JupyterHub.authenticator_class = "pam"
c.Authenticator.allowed_groups = {{{group!r}}}
c.PAMAuthenticator.open_sessions = False
c.Authenticator.admin_users = set()
# Each student's server starts in a root-made cgroup of their own, in a
# root-owned working directory, with their home as the notebooks' folder.
c.JupyterHub.spawner_class = "smolvm_kernel.classroom.deploy.ClassroomSpawner"
c.ClassroomSpawner.student_mem_mib = {mem_mib}
c.ClassroomSpawner.student_cpus = {cpus}
c.ClassroomSpawner.student_tasks = {tasks}
c.ClassroomSpawner.workdir = "{dir}/server-cwd"
c.Spawner.notebook_dir = "~"
c.Spawner.disable_user_config = True
c.Spawner.cmd = [{singleuser!r}]
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
# Nothing from the hub's own environment but what is named here.
c.Spawner.env_keep = ["LANG", "LC_ALL"]
c.Spawner.environment = {{
    "PATH": {path!r},
    "JUPYTER_CONFIG_DIR": "{dir}/jupyter",
    "JUPYTER_DATA_DIR": "{dir}/jupyter-data",      # not ~/.local/share/jupyter (templates, extensions)
    "JUPYTER_PATH": {jupyter_path!r},
    "PYTHONNOUSERSITE": "1",
    "SMOLVM_CACHE_DIR": "{dir}/cache",
    "SMOLVM_AUTO_BUILD": "0",
{policy_env}}}
# The admission service (quotas, budget, audit log) runs with the hub, as root.
c.JupyterHub.services = [{{
    "name": "smolvm-hostd",
    "command": [{smolvm!r}, "hostd", "--socket", "{hostd}"],
    "environment": {{"SMOLVM_CACHE_DIR": "{dir}/cache", {policy_env_inline}}},     # its snapshots' RAM
}}, {{
    # Moves any process of a student that is outside their cgroup into it.
    "name": "smolvm-confine",
    "command": [{smolvm!r}, "classroom", "confine", "--dir", "{dir}", "--student-mem-mib", "{mem_mib}",
                "--student-cpus", "{cpus}", "--student-tasks", "{tasks}"],
}}]
{extra}
"""


def _need_root() -> None:
    if os.geteuid() != 0:
        raise SmolVMError("the classroom set-up creates Unix users and root-owned files: run it as root")


def setup(folder: Path, students: int, port: int = 8000, prefix: str = "student",
          cull_idle_timeout: int = 3600, policy_text: str | None = None, extra_hub_config: str = "",
          student_mem_mib: int | None = None, student_cpus: float | None = None,
          student_tasks: int | None = None, profiles: list[str] | None = None) -> Path:
    """Write the deployment into ``folder`` and create the students; returns the hub config.

    ``student_*`` size each student's cgroup, which holds all their processes
    on the host but their VMMs (confine.py; defaults there). ``profiles`` (e.g. a
    course image's name) are the images offered, instead of the policy's; a
    policy written here allows just them."""
    from smolvm_kernel.classroom import confine
    from smolvm_kernel.host import policy as policy_mod

    _need_root()
    limits = confine.StudentLimits.of(student_mem_mib, student_cpus, student_tasks)
    if limits.mem_mib < 256 or limits.cpus <= 0 or limits.tasks < 64:
        raise SmolVMError(f"a student's server needs more than {limits.describe()} (at least 256 MiB, "
                          f"some CPU, 64 tasks)")
    confine.parents()      # no classroom without the students' cgroups
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    blocked = blocked_for_students(folder)
    if blocked:
        raise SmolVMError(f"students' processes cannot enter {blocked} (no 'x' for others), where the "
                          f"classroom's folder is: choose another --dir, or chmod o+x {blocked}")
    hostd_sock = folder / "hostd.sock"
    audit = folder / "audit.jsonl"
    system_policy = os.path.lexists(policy_mod.POLICY_FILE)
    policy_path = Path(policy_mod.POLICY_FILE) if system_policy else folder / "policy.toml"
    if not system_policy and (policy_text is not None or not policy_path.exists()):
        text = policy_text if policy_text is not None else DEFAULT_POLICY.format(
            host_max_vms=max(2, students * 2), hostd=hostd_sock, audit=audit)
        if profiles and policy_text is None:
            text = text.replace('profiles = ["base", "scipy"]', f"profiles = {json.dumps(profiles)}")
        policy_path.write_text(text)
        os.chown(policy_path, 0, 0)
        os.chmod(policy_path, 0o644)
    pol = policy_mod.load(str(policy_path))
    if profiles:
        refused = [p for p in profiles if pol and pol.profiles is not None and p not in pol.profiles]
        if refused:
            raise SmolVMError(f"the policy {policy_path} does not allow {', '.join(refused)}: add them to its "
                              f"profiles = [...] (or leave out --profile)")
    else:
        profiles = list(pol.profiles) if pol and pol.profiles else ["base"]
    share_cache(folder / "cache", profiles)
    build_shared_snapshots(folder / "cache", profiles, policy_path)
    conf = folder / "jupyter"
    conf.mkdir(exist_ok=True)
    os.chmod(conf, 0o755)
    (conf / "jupyter_server_config.py").write_text(STUDENT_SERVER_CONFIG.format(
        kernelspecs={kernelspec_name(p) for p in profiles},
        cull=cull_idle_timeout, cull_interval=max(1, min(60, cull_idle_timeout // 4))))
    os.chmod(conf / "jupyter_server_config.py", 0o644)
    # jupyter_core marks a config folder as migrated from IPython's by writing
    # this file; a student's server cannot write here, so it is written now.
    (conf / "migrated").write_text("")
    # The servers' working directory and Jupyter data folder: root's, empty.
    for sub in ("server-cwd", "jupyter-data"):
        (folder / sub).mkdir(exist_ok=True)
        os.chown(folder / sub, 0, 0)
        os.chmod(folder / sub, 0o755)
    create_students(students, prefix, folder)
    bin_dir = students_python(folder, profiles)
    policy_env = {} if system_policy else {"SMOLVM_POLICY_FILE": str(policy_path)}
    hub = folder / "jupyterhub_config.py"
    hub.write_text(HUB_CONFIG.format(
        port=port, dir=folder, chp=find_proxy(folder / "proxy"), group=GROUP,
        singleuser=str(bin_dir / "jupyterhub-singleuser"), smolvm=str(bin_dir / "smolvm-kernel"),
        path=f"{bin_dir}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        jupyter_path=str(bin_dir.parent / "share" / "jupyter"),
        hostd=(pol.hostd if pol and pol.hostd else hostd_sock),
        policy_env="".join(f"    {k!r}: {v!r},\n" for k, v in policy_env.items()),
        policy_env_inline=", ".join(f"{k!r}: {v!r}" for k, v in policy_env.items()),
        mem_mib=limits.mem_mib, cpus=limits.cpus, tasks=limits.tasks,
        extra=extra_hub_config))
    os.chmod(hub, 0o600)
    return hub


def hub_command(folder: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(folder / "jupyterhub_config.py")]



def run(folder: Path) -> int:
    """Run the hub (and its proxy and hostd) in the foreground."""
    _need_root()
    return subprocess.call(hub_command(folder), cwd=folder)


def teardown(folder: Path, hub: subprocess.Popen | None) -> None:
    """End a classroom a test or benchmark set up: the hub, every student
    process, the accounts, the proxy and hostd (which the hub stops on a clean
    exit, not after a kill), and the folder."""
    if hub is not None:
        hub.terminate()
        try:
            hub.wait(60)
        except subprocess.TimeoutExpired:
            hub.kill()
    students = read_students(folder) if (folder / "students.csv").exists() else []
    for name, _ in students:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
    if students:
        time.sleep(1)
        down(folder)
    subprocess.run(["pkill", "-f", f"hostd --socket {folder}"], capture_output=True)
    subprocess.run(["pkill", "-f", f"classroom confine --dir {folder}"], capture_output=True)
    subprocess.run(["pkill", "-f", f"{folder}/proxy/"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def down(folder: Path) -> list[str]:
    """Remove the students listed in ``folder/students.csv`` (home folders too)."""
    from smolvm_kernel.classroom import confine

    _need_root()
    done = []
    for name, _ in read_students(folder):
        if subprocess.run(["userdel", "--remove", name], capture_output=True).returncode == 0:
            done.append(name)
        confine.remove(name)
    try:
        if not grp.getgrnam(GROUP).gr_mem:
            subprocess.run(["groupdel", GROUP], capture_output=True)
    except KeyError:
        pass
    return done


# -- in each student's Jupyter Server

try:
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
except ImportError:      # pragma: no cover - jupyter_server comes with the test and classroom extras
    AsyncMappingKernelManager = object


from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel  # noqa: E402
from traitlets import default  # noqa: E402


class ClassroomKernelSpecManager(KernelSpecManager):
    """Only the allowed kernelspecs, and only from folders the student cannot write.

    jupyter_client's own ``allowed_kernelspecs`` filters the list a frontend
    shows, but a kernel started by name through the REST API is looked up
    without it (the host's "python3" starts), and a student's own data folder
    (~/.local/share/jupyter/kernels) comes first in the search, where a
    kernel.json named smolvm-python would shadow the real one.
    """

    @default("kernel_dirs")
    def _only_shared_kernel_dirs(self) -> list[str]:
        from jupyter_core.paths import jupyter_data_dir

        own = os.path.realpath(jupyter_data_dir())
        home = os.path.realpath(os.path.expanduser("~"))
        return [d for d in super()._kernel_dirs_default()
                if not os.path.realpath(d).startswith((own, home + os.sep))]

    def get_kernel_spec(self, kernel_name: str):
        if self.allowed_kernelspecs and kernel_name.lower() not in {k.lower() for k in self.allowed_kernelspecs}:
            raise NoSuchKernel(kernel_name)
        return super().get_kernel_spec(kernel_name)


def kernel_path_refusal(root_dir: str, path: str) -> str | None:
    """Why a kernel may not start with ``path`` (an API path, relative to the
    server's root: the student's home) as its working directory, or None.

    A kernel's working directory is where ``%smolvm push`` reads from and
    ``pull`` writes to, confined to it, and never to a hidden name below it:
    so it must itself be inside the home and not hidden (~/.local, ~/.jupyter
    hold what runs on the host)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        return f"a kernel's folder must be inside your home: {path!r} is not"
    if any(p.startswith(".") for p in parts):
        return f"a kernel's folder may not be hidden: {path!r}"
    root = os.path.realpath(root_dir)
    real = os.path.realpath(os.path.join(root, *parts))
    if real != root and not real.startswith(root + os.sep):
        return f"a kernel's folder must be inside your home: {path!r} leads out of it"
    if any(p.startswith(".") for p in os.path.relpath(real, root).split(os.sep) if p != "."):
        return f"a kernel's folder may not be hidden: {path!r} leads to one"
    return None


class CullingKernelManager(AsyncMappingKernelManager):
    """Jupyter Server's kernel manager, saying in the audit log when it culls an
    idle kernel (the kernel itself only sees a shutdown request), starting
    kernels only in the student's home and never in a hidden folder
    (:func:`kernel_path_refusal`: HTTP 403), and answering a kernel name
    outside the allowed set with 404."""

    async def start_kernel(self, *, kernel_id: str | None = None, path: str | None = None, **kwargs):
        from tornado import web

        why = kernel_path_refusal(self.root_dir, path) if path is not None else None
        if why:
            self.log.warning("refused a kernel in %r: %s", path, why)
            raise web.HTTPError(403, why)
        try:
            return await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs)
        except NoSuchKernel as exc:
            class Missing(web.HTTPError, NoSuchKernel):
                """404 through /api/kernels (which would answer 500 to a bare
                NoSuchKernel), 501 "not available" through /api/sessions."""
            raise Missing(404, f"no such kernel: {exc}".replace("%", "%%")) from None

    async def cull_kernel_if_idle(self, kernel_id: str) -> None:
        had = kernel_id in self
        await super().cull_kernel_if_idle(kernel_id)
        if had and kernel_id not in self:
            record_event("culled", kernel_id=kernel_id, idle_timeout_s=self.cull_idle_timeout)


# -- in the hub (as root)

try:
    from jupyterhub.spawner import LocalProcessSpawner, set_user_setuid
except ImportError:      # pragma: no cover - jupyterhub comes with the classroom extra
    LocalProcessSpawner, set_user_setuid = object, None

from traitlets import Float, Integer, Unicode  # noqa: E402


class ClassroomSpawner(LocalProcessSpawner):
    """LocalProcessSpawner, with each student's server in a cgroup of their own.

    The hub (root) makes the student's cgroup (confine.py) before the spawn;
    the child moves itself in while still root, then drops to the student and
    changes to a root-owned working directory (not the home, which nbconvert
    and others search for templates and configuration). Everything the server
    starts is inside from then on; only hostd moves a kernel's VMM out, into
    the cgroup of its grant. The notebooks' folder stays the home
    (``Spawner.notebook_dir``, ``ServerApp.root_dir``).
    """

    student_mem_mib = Integer(DEFAULT_MEM_MIB, config=True, help="memory of all a student's host processes, MiB")
    student_cpus = Float(DEFAULT_CPUS, config=True, help="CPU cores all a student's host processes may use")
    student_tasks = Integer(DEFAULT_TASKS, config=True,
                            help="processes and threads a student may have on the host")
    workdir = Unicode("/", config=True, help="the servers' working directory (root's)")

    def make_preexec_fn(self, name):
        from smolvm_kernel.classroom import confine
        from smolvm_kernel.host import cgroups

        limits = confine.StudentLimits(self.student_mem_mib, self.student_cpus, self.student_tasks)
        dirs = confine.ensure(name, limits)          # in the hub, as root; raises if it cannot
        self.log.info("%s's server goes into cgroup %s (%s)", name, dirs[0], limits.describe())
        drop = set_user_setuid(name, chdir=False)
        workdir = self.workdir

        def preexec():
            cgroups.join_dirs(dirs)       # still root: the student could not do this later
            drop()
            os.chdir(workdir)
        return preexec

    def user_env(self, env):
        """The student's own runtime files, and JupyterLab's settings and workspaces
        (JSON the frontend reads, no code) in the home; JUPYTER_DATA_DIR is root's."""
        env = super().user_env(env)
        home = env.get("HOME") or pwd.getpwnam(self.user.name).pw_dir
        env["JUPYTER_RUNTIME_DIR"] = f"{home}/.local/share/jupyter/runtime"
        env["JUPYTERLAB_SETTINGS_DIR"] = f"{home}/.jupyter/lab/user-settings"
        env["JUPYTERLAB_WORKSPACES_DIR"] = f"{home}/.jupyter/lab/workspaces"
        return env


def record_event(event: str, **fields) -> None:
    """An audit entry from a student's server: through hostd (which writes it with
    the uid it sees), else to the log directly. Never raises."""
    from smolvm_kernel.host import policy as policy_mod
    from smolvm_kernel.host.admission import HostClient
    from smolvm_kernel.host.audit import AuditLog

    try:
        pol = policy_mod.load()
    except SmolVMError:
        return
    if pol is not None and pol.hostd:
        try:
            client = HostClient(pol.hostd)
        except SmolVMError:
            pass
        else:
            client.event(event, **fields)
            client.list()          # the event is written before the answer
            client.close()
            return
    if pol is not None and pol.audit_log:
        AuditLog(Path(pol.audit_log)).record(event, **fields)


def main_json(folder: Path) -> str:
    return json.dumps({"folder": str(folder), "students": [n for n, _ in read_students(folder)]})
