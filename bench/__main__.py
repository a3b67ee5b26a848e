"""``python -m bench``: see bench/_runner.py, or ``python -m bench --help``.

Needs the bench extra: ``pip install '.[bench]'`` (plus ``matplotlib`` for the plot).

The imports stay under the guard: anyio's process workers run this file as
``__mp_main__`` when they start, and must not pay for trio and the runner.
"""

if __name__ == "__main__":
    import sys

    from bench._runner import main

    sys.exit(main())
