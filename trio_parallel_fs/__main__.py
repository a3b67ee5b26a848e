"""``python -m trio_parallel_fs``: see ``_extras.demo``."""

import sys

from ._extras.demo import main

sys.exit(main())
