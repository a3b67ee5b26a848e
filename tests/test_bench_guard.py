"""The benchmark runner's regression guard (``python -m bench --compare``), on
synthetic reports: no timing here."""

from __future__ import annotations

import pytest

from bench._runner import REGRESSION_TOLERANCE, regressions


def report(rows: dict[str, tuple[bool, dict[str, float]]]) -> dict:
    return {
        "rows": [
            {"case": {"label": label, "unit": "µs", "higher_better": higher}, "values": values}
            for label, (higher, values) in rows.items()
        ]
    }


def test_a_case_of_ours_worse_than_the_tolerance_is_flagged_either_way_the_unit_points():
    baseline = {
        "report": report(
            {
                "warm call p50": (False, {"tpf-fs": 100.0, "tpf-spawn": 100.0, "anyio": 90.0}),
                "128 MB argument": (True, {"tpf-fs": 10.0, "tpf-spawn": 8.0}),
                "only in the baseline": (False, {"tpf-fs": 1.0}),
            }
        )
    }
    now = report(
        {
            "warm call p50": (
                False,
                {"tpf-fs": 100 * (1 + REGRESSION_TOLERANCE) + 1, "tpf-spawn": 110.0, "anyio": 500.0},
            ),
            "128 MB argument": (True, {"tpf-fs": 9.0, "tpf-spawn": 5.0}),
            "new case": (False, {"tpf-fs": 1e9}),
        }
    )
    found = regressions(baseline, now)
    assert found == [
        "warm call p50 [tpf-fs]: 116 µs now, 100 in the baseline (1.16x worse)",
        "128 MB argument [tpf-spawn]: 5 µs now, 8 in the baseline (1.60x worse)",
    ]


def test_an_unchanged_run_has_no_regressions():
    same = report({"warm call p50": (False, {"tpf-fs": 100.0, "tpf-spawn": 120.0})})
    assert regressions({"report": same}, same) == []


def test_the_runners_help_prints_and_names_the_tolerance(capsys):
    from bench._runner import parse_args

    with pytest.raises(SystemExit) as stopped:
        parse_args(["--help"])
    assert stopped.value.code == 0
    assert f"{REGRESSION_TOLERANCE * 100:.0f}% worse" in " ".join(capsys.readouterr().out.split())
