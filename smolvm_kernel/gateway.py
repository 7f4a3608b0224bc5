"""A Jupyter gateway's entry point on a host: run SmolVM's side of a remote launch.

``python .../smolvm_kernel/gateway.py --kernel-id ID --response-address IP:PORT ...``

The code is in :mod:`smolvm_kernel.remote.launcher`; this file stays at the
path that gateway kernelspecs (``smolvm-kernel install --gateway``) name, so
those written by any version keep working.
"""

import os
import sys

if __name__ == "__main__":
    # Run as a script: its folder (the package) is first on sys.path, where a
    # module (jupyter/, host/, ...) could shadow a top-level package.
    _here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != _here]

    from smolvm_kernel.remote.launcher import main

    sys.exit(main())
