"""Turns on a platform view in every interpreter started with this folder on
PYTHONPATH and TPF_PLATFORM_VIEW set (the test run and its child processes).
See platform_view.py."""

import os

if os.environ.get("TPF_PLATFORM_VIEW"):
    import platform_view

    platform_view.install_from_environment()
