"""The benchmark scripts' shared report file: each rewrites its own section and keeps the others'."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from report_section import replace_section  # noqa: E402


def test_a_section_is_appended_then_replaced_in_place():
    doc = replace_section("", "M8", "# M8\nold")
    doc = replace_section(doc, "P9 after", "p9 table")
    assert doc == "<!-- section M8 -->\n# M8\nold\n<!-- end M8 -->\n\n<!-- section P9 after -->\np9 table\n<!-- end P9 after -->\n"
    again = replace_section(doc, "M8", "# M8\nnew")
    assert again == doc.replace("old", "new")
    assert replace_section(again, "P9 after", "p9 table") == again  # idempotent


def test_a_section_name_is_taken_literally():
    doc = replace_section("", "P9 (a)", "x")
    assert replace_section(doc, "P9 (a)", "y").count("<!-- section") == 1
