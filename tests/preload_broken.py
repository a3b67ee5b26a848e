"""A module that fails to import."""

raise ImportError("preload_broken fails to import on purpose")
