"""The in-guest kernel's main: ipykernel with the bounds the agent relies on.

Not imported by the agent: kernel.py runs this file's text with ``python -c``
as the unprivileged user (so the guest package is not on the kernel's path).
What it changes, before ipykernel starts (see kernel.py for why):

- the working folder and "" leave ``sys.path`` (a user's file never shadows a module);
- a process the kernel forks is the OOM killer's first choice (oom_score_adj 500);
- the kernel's IOPub PUB socket queues at most 16 messages for a slow reader;
- stdout/stderr text waiting for the IO thread is flushed once it passes 1 MiB.
"""

import os
import sys


def _forked() -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("500")
    except OSError:
        pass


def main() -> None:
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]
    os.register_at_fork(after_in_child=_forked)

    import zmq

    socket = zmq.Context.socket

    def bounded_socket(self, kind, *args, **kwargs):
        sock = socket(self, kind, *args, **kwargs)
        if kind == zmq.PUB:
            sock.sndhwm = 16
        return sock
    zmq.Context.socket = bounded_socket

    from ipykernel import iostream, kernelapp

    write = iostream.OutStream.write

    def flushing_write(self, string):
        n = write(self, string)
        try:
            with self._buffer_lock:
                waiting = sum(b.tell() for b in self._buffers.values())
        except AttributeError:     # another ipykernel: its own buffering applies
            return n
        if waiting > 1 << 20 and self._is_master_process():
            self.flush()
        return n
    iostream.OutStream.write = flushing_write
    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
