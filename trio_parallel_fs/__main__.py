"""``python -m trio_parallel_fs``: see ``_demo``."""

import sys

from ._demo import main

sys.exit(main())
