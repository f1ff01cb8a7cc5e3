"""The CSV report: the original 22 columns first, every row written, names it cannot encode escaped, never lost."""
from __future__ import annotations

import csv
import os

import pytest

from pytest_ait_llm.compare.result import UNPAIRED, CompareResult, Row
from pytest_ait_llm.report.csv_report import AIT_COLUMNS, write_csv


def _rows(name: str, path: str) -> list[Row]:
    return [Row(0, 0, 3, "0_1", atb_op="1_Layer/2_LinearOperation", atb_op_name=name, golden_path=path,
                status=UNPAIRED, reason="no mapping rule"),
            Row(0, 0, 4, "0_1", atb_op="1_Layer/3_LinearOperation", atb_op_name="plain", status=UNPAIRED)]


def _read(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:  # valid UTF-8 throughout
        return list(csv.reader(fh))


def test_the_original_columns_come_first_and_every_row_is_written(tmp_path):
    path = write_csv(CompareResult(_rows("op", "/d/output.pth"), []), tmp_path)
    table = _read(path)
    assert table[0][:22] == AIT_COLUMNS and len(table) == 3
    assert table[1][2] == "/d/output.pth"


@pytest.mark.parametrize("name, path, shown", [
    ("q\udcffproj", "/d/output.pth", "q\\udcffproj"),  # a lone surrogate from a topology's JSON
    ("op", os.fsdecode("/d/金/output.pth".encode("gbk")), "/d/\\udcbd\\udcf0/output.pth"),
    ("层", "/d/输出.pth", "层"),  # encodable names stay as they are
], ids=["lone surrogate", "GBK bytes in a path", "UTF-8"])
def test_names_utf8_cannot_hold_are_escaped_not_lost(tmp_path, name, path, shown):
    written = write_csv(CompareResult(_rows(name, path), []), tmp_path)
    text = written.read_text(encoding="utf-8")
    assert shown in text and len(_read(written)) == 3
    assert [p.name for p in tmp_path.iterdir()] == [written.name]  # no temp file left beside it
