"""Terminal tables and the numbers in them: exact text."""
from __future__ import annotations

from tpusim.report.tables import (format_agreement, format_duration, format_energy, format_percent, format_rate,
                                  format_table)


def test_a_table_aligns_numbers_right_and_names_left_with_separators_on_every_count():
    rows = [{"name": "conv1", "macs": 118_013_952, "cycles": 3136, "ratio": 0.25, "flag": True},
            {"name": "fc", "macs": 2_048_000, "cycles": 12, "ratio": 123456.7, "flag": False}]
    assert format_table(("name", "macs", "cycles", "ratio", "flag"), rows, left=("name",)).splitlines() == [
        "name          macs  cycles    ratio   flag",
        "-----  -----------  ------  -------  -----",
        "conv1  118,013,952   3,136     0.25   True",
        "fc       2,048,000      12  123,457  False",
    ]


def test_headers_relabel_and_max_rows_counts_what_it_left_out():
    rows = [{"n": i} for i in range(5)]
    assert format_table(("n",), rows, max_rows=3, headers={"n": "count"}).splitlines() == [
        "count", "-----", "    0", "    1", "... 3 more rows"]


def test_the_shrink_column_is_cut_in_the_middle_to_fit_the_width():
    rows = [{"layer": "encoder.layer.11.attention.output.dense", "cycles": 1234}]
    text = format_table(("layer", "cycles"), rows, left=("layer",), width=30, shrink="layer")
    assert text.splitlines() == [
        "layer                   cycles",
        "----------------------  ------",
        "encoder.la...put.dense   1,234",
    ]


def test_the_shrink_column_keeps_at_least_eight_characters():
    rows = [{"layer": "a_rather_long_layer_name", "cycles": 1}]
    first_row = format_table(("layer", "cycles"), rows, left=("layer",), width=5, shrink="layer").splitlines()[2]
    assert first_row == "a_r...me       1"
    # A column already that narrow is left as it is.
    short = format_table(("layer", "cycles"), [{"layer": "fc", "cycles": 1}], left=("layer",), width=5, shrink="layer")
    assert short.splitlines()[2] == "fc          1"


def test_percent_and_agreement_carry_their_basis():
    assert format_percent(0.093) == "9.3 %"
    assert format_percent(0.0019, 2) == "0.19 %"
    assert format_agreement(0.9375, 16) == "15/16 (94 %)"
    assert format_agreement(1.0, 4) == "4/4 (100 %)"
    assert format_agreement(0.0, 1000) == "0/1,000 (0 %)"


def test_energy_takes_the_unit_its_magnitude_calls_for():
    assert format_energy(2.055e10) == "20.55 mJ"  # the 2.055e+04 uJ
    assert format_energy(4.3234e10) == "43.23 mJ"
    assert format_energy(306_961_403.6) == "307 uJ"
    assert format_energy(18_041_403.6) == "18.04 uJ"
    assert format_energy(1500.0) == "1.5 nJ"
    assert format_energy(999.0) == "999 pJ"
    assert format_energy(0.0) == "0 pJ"
    assert format_energy(3.2e12) == "3.2 J"
    assert format_energy(5e16) == "50,000 J"


def test_durations_and_rates():
    assert format_duration(1.0318571428571428e-05) == "10.32 us"
    assert format_duration(0.9541e-3) == "954.1 us"
    assert format_duration(3.17e-3) == "3.17 ms"
    assert format_duration(2.5) == "2.5 s"
    assert format_duration(5e-10) == "0.5 ns"
    assert format_rate(96_912.64) == "96,913"
    assert format_rate(1048.2) == "1,048"
    assert format_rate(2.5) == "2.5"
