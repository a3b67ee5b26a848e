"""Sphinx configuration for the trio_parallel_fs documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
The build needs no network: intersphinx is not used, so references to Trio
and the standard library are plain text, not links. It needs nothing beyond the
``docs`` extra either (CI builds it in a venv holding only that): no page
autodocs a module that imports pytest or the test tools; the pytest plugin's
page describes it in prose.
"""

import os
import sys

# Document the checkout this file belongs to, installed or not.
sys.path.insert(0, os.path.abspath(".."))

import trio_parallel_fs  # noqa: E402

project = "trio_parallel_fs"
author = "the trio_parallel_fs authors"
copyright = "the trio_parallel_fs authors"
release = trio_parallel_fs.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

exclude_patterns = ["_build", "examples"]
# `Name` in docstrings and pages: a cross-reference where one exists, else code.
default_role = "py:obj"
primary_domain = "py"
highlight_language = "python3"

autodoc_member_order = "bysource"
# trio_parallel_fs.dask needs Dask's distributed, which only the dask extra
# installs: the docs build (with only the docs extra) documents it against a
# stand-in, as its docstrings say everything the page shows.
autodoc_mock_imports = ["distributed", "dask"]
# Signatures without annotations read better (``sync_fn, *args, ...``); the
# parameters' types are in their descriptions.
autodoc_typehints = "none"
autodoc_preserve_defaults = True

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# run_sync's docstring has a section trio's style calls "Cancellation handling".
napoleon_custom_sections = ["Cancellation handling"]

html_theme = "alabaster"
html_theme_options = {
    "description": "Trio workers forked from a preloaded template",
    "fixed_sidebar": True,
}
html_static_path = []
