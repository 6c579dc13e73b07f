"""The scaling suite's memory breakdown table: PSS by process role at each size's peak."""

from __future__ import annotations

from pipeline.bench.scaling import role_table


def test_roles_are_ranked_at_the_largest_size_and_the_rest_summed() -> None:
    rows = [
        {"images": 10, "peak_pss_by_role_mb": {"driver": 300.0, "raylet": 50.0, "ray::IDLE": 20.0}},
        {
            "images": 100,
            "peak_pss_by_role_mb": {"ray::Scorer": 900.0, "driver": 310.0, "raylet": 5.0},
        },
    ]
    lines = role_table(rows, top=2).markdown().splitlines()
    assert lines[0] == "| role | 10 images | 100 images |"
    assert lines[2:] == [
        "| ray::Scorer | 0.000 | 900 |",
        "| driver | 300 | 310 |",
        "| other | 70.000 | 5.000 |",
    ]
