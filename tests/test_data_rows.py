"""Row sources and the split of rows into parts."""

from __future__ import annotations

import json

import pytest
from data_helpers import chat, write_jsonl

from msd.data.conversations import RowError, SkipReason
from msd.data.rows import Part, open_rows
from msd.errors import MSDError


@pytest.mark.parametrize("total, start, limit", [(0, 0, None), (10, 0, None), (17, 3, None), (17, 3, 9), (5, 7, 2)])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_parts_disjoint_and_complete(total, start, limit, count):
    expected = set(range(start, total if limit is None else min(total, start + limit)))
    parts = [set(Part(index, count).rows(total, start, limit)) for index in range(count)]
    assert set().union(*parts) == expected
    assert sum(len(rows) for rows in parts) == len(expected)


@pytest.mark.parametrize("machines, processes", [(1, 4), (2, 3), (3, 1)])
def test_process_split_disjoint_and_complete(machines, processes):
    total = 50
    for machine in range(machines):
        part = Part(machine, machines)
        pieces = [set(part.split(process, processes).rows(total)) for process in range(processes)]
        assert set().union(*pieces) == set(part.rows(total))
        assert sum(len(rows) for rows in pieces) == len(part.rows(total))


def test_part_names_and_parsing():
    assert Part.parse("2/5") == Part(2, 5)
    assert Part(2, 5).name == "part-00002-of-00005"
    for text in ("5/5", "1", "a/b", "-1/3", "1/0"):
        with pytest.raises(MSDError, match="shard"):
            Part.parse(text)


def test_negative_start_rejected():
    with pytest.raises(MSDError, match="--start"):
        Part().rows(10, start=-1)
    with pytest.raises(MSDError, match="--limit"):
        Part().rows(10, limit=-1)


def test_jsonl_malformed_line_is_one_row(tmp_path):
    rows = open_rows(write_jsonl(tmp_path / "rows.jsonl", [chat("Q", "A"), "{not json", "", chat("Q2", "A2")]))
    assert len(rows) == 3  # the blank line is not a row
    assert rows[0]["conversations"][0]["value"] == "Q"
    with pytest.raises(RowError) as caught:
        rows[1]
    assert caught.value.reason == SkipReason.MALFORMED_JSON
    assert rows[2]["conversations"][1]["value"] == "A2"


def test_json_list(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([chat("Q", "A"), chat("Q2", "A2")]))
    assert len(open_rows(path)) == 2
    path.write_text('{"id": 1}')
    with pytest.raises(MSDError, match="list"):
        open_rows(path)
    path.write_text("[{")
    with pytest.raises(MSDError, match="not valid JSON"):
        open_rows(path)


def test_unsupported_file(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,conversations\n")
    with pytest.raises(MSDError, match="unsupported"):
        open_rows(path)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json"])
def test_missing_local_file_raises(tmp_path, monkeypatch, name):
    # A missing path with a row-file extension must fail as a missing file, without asking the Hub for a dataset
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MSDError, match=f"data file not found: {name}"):
        open_rows(name)
    with pytest.raises(MSDError, match="data file not found"):
        open_rows(tmp_path / "missing" / name)


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [chat("Q", "A", row_id="x"), chat("Q2", "A2", row_id="y")]
    dataset = datasets.Dataset.from_list(rows)
    dataset.save_to_disk(str(tmp_path / "saved"))
    loaded = open_rows(tmp_path / "saved")
    assert len(loaded) == 2
    assert loaded[1]["id"] == "y"
    assert loaded[1]["conversations"][1] == {"from": "gpt", "value": "A2"}
    assert open_rows(dataset) is dataset
