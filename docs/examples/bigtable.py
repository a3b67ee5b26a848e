"""A module that holds a large read-only table, as a model or a lookup
table would. Preloaded, its pages are shared by every worker."""

TABLE = bytes(range(256)) * (256 * 1024)  # 64 MiB, every page written
