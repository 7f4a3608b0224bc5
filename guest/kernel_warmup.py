"""The warm-up cell the agent runs once in a fresh kernel (see kernel.py's
``warmup_cell`` for why), kept as a file so that it reads, lints and tests
as Python. Not imported by the agent: its text is sent as the cell's code,
and runs in the kernel's namespace, where ``get_ipython`` exists.
"""
# Only the function below is sent (kernel.warmup_cell); there get_ipython is
# the kernel's. This line is for readers and linters of the file.
get_ipython = globals().get("get_ipython")


def _smolvm_warmup(key_fd, ack_fd, killed_file):
    import os, sys, threading
    kernel = get_ipython().kernel

    def rekey():
        # One key per restore of this kernel's VM (a ready snapshot's fork,
        # then each restore of a checkpoint): a line each, answered "k".
        # Whatever happens, the answer pipe is closed at the end: the agent
        # sees "k" or EOF.
        import random, uuid
        try:
            with os.fdopen(key_fd, "rb", buffering=0) as pipe:
                key = b""
                while True:
                    chunk = pipe.read(128)
                    if not chunk:
                        return
                    key += chunk
                    if not key.endswith(b"\n"):
                        continue
                    kernel.session.key = key.strip()
                    kernel.session.session = str(uuid.uuid4())   # the msg_id prefix, too
                    random.seed()
                    numpy_random = sys.modules.get("numpy.random")
                    if numpy_random is not None:
                        numpy_random.seed()
                    os.write(ack_fd, b"k")
                    key = b""
        finally:
            os.close(ack_fd)

    threading.Thread(target=rekey, name="smolvm-rekey", daemon=True).start()
    # An error in a cell (an interrupt included) formats its traceback with
    # stack_data: executing parses the source of every file in it (IPython's
    # interactiveshell.py too, ~12k nodes) and pygments compiles its Python
    # lexer (~0.6 s under TCG); both are cached per process. Only a real
    # cell's error path fills those caches: one nested cell here, its output
    # unseen (the agent drops its own requests' messages), no history entry.
    try:
        get_ipython().run_cell("raise KeyboardInterrupt", store_history=False)
    except Exception:
        pass   # only a warm-up: the re-key thread above is what must work
    finally:
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            sys.__dict__.pop(name, None)   # %debug must not find the warm-up's error
    # A child of this kernel killed at a limit (by the agent or by the group's
    # OOM killer, limits.py) stays a zombie, holding a slot of the process
    # limit, until waited for. After a cell in which the agent acted (it
    # rewrites the file), the kernel waits for each zombie child that SIGKILL
    # ended (other children are left to whoever started them).
    seen = [None]

    def reap_killed(*_):
        try:
            stamp = os.stat(killed_file).st_mtime_ns
        except OSError:
            return
        if stamp == seen[0]:
            return
        seen[0] = stamp
        me = str(os.getpid())
        for entry in os.listdir("/proc"):
            try:
                with open("/proc/" + entry + "/stat") as fh:
                    state, ppid = fh.read().rsplit(")", 1)[1].split()[:2]
                if state != "Z" or ppid != me:
                    continue
                pid = int(entry)
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                if info is not None and info.si_code == os.CLD_KILLED and info.si_status == 9:
                    os.waitpid(pid, os.WNOHANG)
            except (OSError, ValueError):
                continue
    get_ipython().events.register("post_run_cell", reap_killed)
