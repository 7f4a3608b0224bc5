"""Code that runs inside the microVM: the guest init and agent.

Nothing here imports the host package; it needs only the guest image's
Python and pyzmq. The host imports :mod:`smolvm_guest.wire` so that the
frame format is defined exactly once.
"""
