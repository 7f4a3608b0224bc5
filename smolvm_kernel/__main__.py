"""``python -m smolvm_kernel -f CONNECTION_FILE``: run the SmolVM Python kernel.

Kernelspecs start :mod:`smolvm_kernel.launch` instead, which listens on the
ports first; this entry point stays for older kernelspecs and for hand use.
"""

import os
import sys

from smolvm_kernel.launch import without_folder

# ``-m`` put the working directory (a notebook's folder) first on sys.path:
# nothing the kernel imports on the host may come from there.
sys.path[:] = without_folder(sys.path, os.getcwd())

from smolvm_kernel.jupyter.kernel import main  # noqa: E402

sys.exit(main())
