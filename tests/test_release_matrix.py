"""tools/release_matrix.py: table cells from JUnit outcomes (no release is installed here)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import release_matrix as rm  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="t" name="test_paci_trains_megatron_lm_with_drift_per_stage[2-expected0]"/>
<testcase classname="t" name="test_paci_trains_megatron_lm_with_drift_per_stage[4-expected1]">
<failure message="boom"/></testcase>
<testcase classname="t" name="test_without_the_flag_and_with_1f1b_megatron_is_unchanged"/>
<testcase classname="t" name="test_tensorboard_event_file_holds_the_drift_per_stage">
<skipped message="pip install tensorboard"/></testcase>
<testcase classname="t" name="test_moe_drained_paci_prints_1f1b_losses_and_continuous_paci_trains">
<error message="crash"/></testcase>
</testsuite></testsuites>"""


def test_cells_say_yes_only_when_every_test_of_the_column_passed(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    tests = rm.outcomes(str(path))
    assert tests["test_without_the_flag_and_with_1f1b_megatron_is_unchanged"] == "passed"
    assert tests["test_tensorboard_event_file_holds_the_drift_per_stage"] == "skipped"
    cells = {column: rm.cell(tests, prefixes) for column, prefixes in rm.COLUMNS.items()}
    assert cells["paci trains"] == "NO"  # PP 2 passed, PP 4 failed
    assert cells["no-flag unchanged"] == "yes"
    assert cells["MoE"] == "NO"  # an error counts as a failure
    assert cells["TensorBoard"] == "-" and cells["save/resume"] == "-"  # skipped / not run


def test_markdown_has_a_row_per_release_and_every_column():
    rows = [{"release": "0.16.1", "megatron_core": "0.16.1", "installs": "yes",
             **{c: "yes" for c in rm.COLUMNS}, "passed": "10/10"},
            {"release": "main", "installs": "NO"}]
    lines = rm.markdown(rows).splitlines()
    assert lines[0].count("|") == len(rm.COLUMNS) + 5
    assert lines[2].startswith("| 0.16.1 | 0.16.1 | yes | yes |") and lines[2].endswith("| 10/10 |")
    assert lines[3] == "| main | - | NO | " + "- | " * len(rm.COLUMNS) + "- |"
