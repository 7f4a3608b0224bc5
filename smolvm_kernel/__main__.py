"""``python -m smolvm_kernel -f CONNECTION_FILE``: run the SmolVM Python kernel.

Kernelspecs start :mod:`smolvm_kernel.launch` instead, which listens on the
ports first; this entry point stays for older kernelspecs and for hand use.
"""

import os
import sys

# ``-m`` put the working directory (a notebook's folder) first on sys.path:
# nothing the kernel imports on the host may come from there.
sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != os.getcwd()]

from smolvm_kernel.kernel import main  # noqa: E402

sys.exit(main())
