"""A preload that ends its process as it is imported (exit code 3)."""

import os

os._exit(3)
