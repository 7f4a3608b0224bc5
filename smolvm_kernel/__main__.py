"""``python -m smolvm_kernel -f CONNECTION_FILE``: run the SmolVM Python kernel."""

import sys

from smolvm_kernel.kernel import main

sys.exit(main())
