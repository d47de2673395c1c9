"""`flywheel import`: JSONL, JSON arrays, CSV, parquet and saved HF datasets become one store
version with file lineage; malformed files are refused with where and how to fix, and
nothing is written.

Real files in a temp folder, the real store and DuckDB catalog, real `datasets` folders."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.store import ImportRefused, import_file, list_datasets, read_dataset, sql
from flywheel.store.importing import CHAT_TYPE, MAX_PROBLEMS

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


def jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_sha256(folder: Path) -> str:
    """The documented folder hash: each file's relative path, size and bytes, sorted."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        digest.update(f"{file.relative_to(folder).as_posix()}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def lineage(name: str) -> list[dict[str, Any]]:
    frame = sql(f"select * from lineage where dataset = '{name}'")
    return frame.to_dict(orient="records")


def assert_file_lineage(name: str, source: Path, digest: str) -> None:
    (row,) = lineage(name)
    assert row["produced_by"] == "import"
    assert row["kind"] == "dataset"
    assert row["input_kind"] == "file"
    assert row["input_dataset"] == str(source.absolute())
    assert row["input_version"] == f"sha256:{digest}"
    assert row["version"] == read_dataset(name).version


# ---- good files ---------------------------------------------------------------------------


def test_jsonl_lands_with_rows_types_and_lineage(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "seeds.jsonl"
    rows = [
        {"instruction": "add 1 and 2", "response": "3", "score": 1, "tags": ["math"]},
        {"instruction": "say hi", "response": "hi", "score": 0.5, "tags": []},
    ]
    source.write_bytes(jsonl(rows) + b"\n")  # a trailing blank line is fine
    report = import_file(source, "seeds")
    assert report.rows == 2 and report.duplicates == 0
    assert report.columns == {
        "instruction": "string",
        "response": "string",
        "score": "double",
        "tags": "list<item: string>",
    }
    assert report.text_columns == ["instruction", "response"]
    stored = read_dataset("seeds").to_arrow().to_pylist()
    assert stored == [{**rows[0], "score": 1.0}, rows[1]]
    assert report.sha256 == sha256_of(source)
    assert_file_lineage("seeds", source, sha256_of(source))
    assert read_dataset("seeds").meta["inputs"] == [
        {"kind": "file", "name": str(source), "version": f"sha256:{sha256_of(source)}"}
    ]


def test_csv_lands_with_inferred_types(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "pairs.csv"
    source.write_text(
        'id,prompt,weight,zip\n1,"hello, world",0.5,007\n2,"two\nlines",1,010\n', newline=""
    )
    report = import_file(source, "pairs")
    assert report.rows == 2
    assert report.columns == {
        "id": "int64",
        "prompt": "string",
        "weight": "double",
        "zip": "string",
    }
    assert read_dataset("pairs").to_arrow().to_pylist() == [
        {"id": 1, "prompt": "hello, world", "weight": 0.5, "zip": "007"},
        {"id": 2, "prompt": "two\nlines", "weight": 1.0, "zip": "010"},
    ]
    assert_file_lineage("pairs", source, sha256_of(source))


def test_parquet_lands_keeping_its_types(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "t.parquet"
    table = pa.table({"text": ["a", "b", "c"], "n": pa.array([1, 2, 3], type=pa.int32())})
    pq.write_table(table, source)
    report = import_file(source, "from_parquet")
    assert report.rows == 3 and report.columns == {"text": "string", "n": "int32"}
    assert read_dataset("from_parquet").to_arrow().equals(table)
    assert_file_lineage("from_parquet", source, sha256_of(source))


def test_hf_folder_lands_with_folder_hash(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    rows = [{"question": "q1", "answer": "a1", "messages": CHAT}, {"question": "q2",
            "answer": "a2", "messages": CHAT[1:]}]  # fmt: skip
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    report = import_file(folder, "from_hf")
    assert report.format == "hf" and report.rows == 2
    assert report.chat_columns == ["messages"]
    assert read_dataset("from_hf").to_arrow().to_pylist() == rows
    # the HF schema metadata is not carried over: the store's own to_hf reads the version
    assert read_dataset("from_hf").to_hf()["question"] == ["q1", "q2"]
    assert_file_lineage("from_hf", folder, folder_sha256(folder))


def test_hf_dataset_dict_needs_a_split(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "dd"
    train = datasets.Dataset.from_list([{"text": "t1"}, {"text": "t2"}])
    test = datasets.Dataset.from_list([{"text": "e1"}])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(folder))
    with pytest.raises(ImportRefused) as refused:
        import_file(folder, "dd")
    assert "DatasetDict with splits test, train: pass --split NAME" in str(refused.value)
    assert list_datasets() == []
    report = import_file(folder, "dd", split="test")
    assert report.rows == 1
    assert read_dataset("dd").to_arrow().to_pylist() == [{"text": "e1"}]
    with pytest.raises(ImportRefused, match="'dev': no such split; splits: test, train"):
        import_file(folder, "dd", split="dev")


def test_map_renames_and_require_checks_after_renaming(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "raw.jsonl"
    source.write_bytes(jsonl([{"prompt": "p", "completion": "c", "extra": 1}]))
    report = import_file(
        source,
        "renamed",
        column_map={"prompt": "instruction", "completion": "response"},
        require=["instruction", "response"],
    )
    assert list(report.columns) == ["instruction", "response", "extra"]
    assert read_dataset("renamed").to_arrow().to_pylist() == [
        {"instruction": "p", "response": "c", "extra": 1}
    ]


def test_map_to_a_taken_name_is_refused(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "raw.jsonl"
    source.write_bytes(jsonl([{"prompt": "p", "response": "c"}]))
    with pytest.raises(ImportRefused, match="'prompt' and 'response' would both be named"):
        import_file(source, "renamed", column_map={"prompt": "response"})
    with pytest.raises(ImportRefused, match="no column 'question'; columns: 'prompt', 'resp"):
        import_file(source, "renamed", column_map={"question": "instruction"})
    assert list_datasets() == []


def test_chat_column_reads_back_as_messages(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "chat.jsonl"
    # key order and a null extra key do not matter; the stored type is fixed
    messages = [{"content": "hi", "role": "user", "name": None}, {"role": "assistant",
                "content": "hello"}]  # fmt: skip
    source.write_bytes(jsonl([{"id": 1, "messages": messages}, {"id": 2, "messages": CHAT}]))
    report = import_file(source, "chats")
    assert report.chat_columns == ["messages"] and report.text_columns == ["messages"]
    ref = read_dataset("chats")
    assert ref.to_arrow().schema.field("messages").type == CHAT_TYPE
    assert ref.to_arrow().column("messages").to_pylist() == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        CHAT,
    ]
    frame = sql("select messages[2].content as second from chats order by id")
    assert frame.second.tolist() == ["hello", "What is 2+2?"]


def test_json_array_imports_with_format_json(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "array.json"
    source.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    report = import_file(source, "array", format="json")
    assert report.rows == 2 and report.format == "json"


def test_bom_and_crlf_are_accepted_when_allowed(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "windows.csv"
    source.write_bytes(b"\xef\xbb\xbftext,n\r\nhello,1\r\nworld,2\r\n")
    report = import_file(source, "windows", allow_bom=True, allow_crlf=True)
    assert report.columns == {"text": "string", "n": "int64"}
    assert read_dataset("windows").to_arrow().to_pylist() == [
        {"text": "hello", "n": 1},
        {"text": "world", "n": 2},
    ]


def test_duplicates_are_counted_then_dropped(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "dups.jsonl"
    # 1 and 1.0 in a number column are the same value
    rows = [{"t": "a", "n": 1}, {"t": "b", "n": 2}, {"t": "a", "n": 1.0}, {"t": "a", "n": 1}]
    source.write_bytes(jsonl(rows))
    kept = import_file(source, "dups")
    assert (kept.rows, kept.duplicates, kept.dropped) == (4, 2, 0)
    assert kept.first_duplicate == "line 3 repeats line 1"
    assert "2 duplicate rows kept (--drop-duplicates drops them)" in kept.summary()
    dropped = import_file(source, "dups", drop_duplicates=True)
    assert (dropped.rows, dropped.duplicates, dropped.dropped) == (2, 2, 2)
    assert "2 duplicate rows dropped" in dropped.summary()
    assert read_dataset("dups").to_arrow().to_pylist() == [
        {"t": "a", "n": 1.0},
        {"t": "b", "n": 2.0},
    ]


def test_a_required_text_column_is_reported_once(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "req.jsonl"
    source.write_bytes(jsonl([{"q": "a", "r": "b"}, {"q": "c"}]))
    with pytest.raises(ImportRefused) as refused:
        import_file(source, "req", require=["r"])
    assert refused.value.problems == [
        "line 2, column 'r': has no 'r' key, and it is a text column; fill it in or drop the "
        "row (or name the text columns with --text)"
    ]


def test_text_option_narrows_the_text_columns(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "partial.jsonl"
    source.write_bytes(jsonl([{"q": "a", "note": ""}, {"q": "b", "note": None}]))
    with pytest.raises(ImportRefused, match="line 1, column 'note': the text is empty"):
        import_file(source, "partial")
    report = import_file(source, "partial", text=["q"])
    assert report.text_columns == ["q"] and report.rows == 2


# ---- malformed files: refused, located, nothing written -----------------------------------

BIG = "SECRET-" + "x" * 2000 + "-TAIL"
BAD_CHAT = [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]

# name -> (file name, bytes, import_file options, what the message must say)
MALFORMED: dict[str, tuple[str, bytes, dict[str, Any], list[str]]] = {
    "invalid_utf8": (
        "a.jsonl",
        b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
        {},
        ["line 2, byte offset 28 of the file (13 into the line)", "bytes e9", "not valid UTF-8"],
    ),
    "invalid_json": (
        "a.jsonl",
        b'{"text": "a"}\n{"text": "b",}\n',
        {},
        ["line 2: not valid JSON: Expecting property name enclosed in double quotes"],
    ),
    "json_array": (
        "a.jsonl",
        b'[{"text": "a"},\n {"text": "b"}]\n',
        {},
        ["line 1: the file is one JSON array (2 items)", "jq -c '.[]'", "--format json"],
    ),
    "pretty_object": (
        "a.jsonl",
        b'{\n  "text": "a"\n}\n',
        {},
        ["line 1: the file is one JSON object spread over 3 lines"],
    ),
    "not_an_object": (
        "a.jsonl",
        b'{"text": "a"}\n"just text"\n',
        {},
        ["line 2: a JSON string, not an object"],
    ),
    "repeated_key": (
        "a.jsonl",
        b'{"text": "a", "text": "b"}\n',
        {},
        ["line 1: the key 'text' appears twice"],
    ),
    "nan": ("a.jsonl", b'{"text": "a", "x": NaN}\n', {}, ["line 1: NaN is not valid JSON"]),
    "missing_column": (
        "a.jsonl",
        jsonl([{"instruction": "a"}]),
        {"require": ["response"]},
        ["missing column 'response' (--require); columns present: 'instruction'", "--map"],
    ),
    "missing_in_a_row": (
        "a.jsonl",
        jsonl([{"q": "a", "r": 1}, {"q": "c"}]),
        {"require": ["r"]},
        ["1 problem,", "line 2, column 'r': missing (a --require column)"],
    ),
    "mistyped_column": (
        "a.jsonl",
        jsonl([{"text": "a", "n": 1}, {"text": "b", "n": 2}, {"text": "c", "n": "three"}]),
        {},
        ["line 3, column 'n': holds string, but line 1 holds integer"],
    ),
    "mixed_list": (
        "a.jsonl",
        jsonl([{"text": "a", "xs": [1, "two"]}]),
        {},
        ["line 1, column 'xs': a list mixing integer and string (item 1)"],
    ),
    "null_text": (
        "a.jsonl",
        jsonl([{"text": "a"}, {"text": None}]),
        {},
        ["line 2, column 'text': is null, and it is a text column"],
    ),
    "absent_text": (
        "a.jsonl",
        jsonl([{"text": "a", "id": 1}, {"id": 2}]),
        {},
        ["line 2, column 'text': has no 'text' key"],
    ),
    "empty_text": (
        "a.jsonl",
        jsonl([{"text": "a"}, {"text": ""}]),
        {},
        ["line 2, column 'text': the text is empty"],
    ),
    "blank_text": (
        "a.jsonl",
        jsonl([{"text": " \n "}]),
        {},
        ["line 1, column 'text': the text is only whitespace"],
    ),
    "nul": (
        "a.jsonl",
        jsonl([{"text": "a\u0000b"}]),
        {},
        ["line 1, column 'text': the text holds the control character U+0000 (NUL) at character 1"],
    ),
    "control_char": (
        "a.jsonl",
        jsonl([{"text": "ok"}, {"text": "\u001b[31mred"}]),
        {},
        ["line 2, column 'text': the text holds the control character U+001B (escape)"],
    ),
    "lone_surrogate": (
        "a.jsonl",
        b'{"text": "a\\ud800b"}\n',
        {},
        ["line 1, column 'text': the text holds U+D800 at character 1"],
    ),
    "oversized": (
        "a.jsonl",
        jsonl([{"text": "fine"}, {"text": BIG}]),
        {"max_field_bytes": 1000},
        ["line 2, column 'text': the value is 2,012 bytes, above the limit of 1,000"],
    ),
    "bom": (
        "a.jsonl",
        b'\xef\xbb\xbf{"text": "a"}\n',
        {},
        ["line 1: the file starts with a UTF-8 byte-order mark", "--allow-bom"],
    ),
    "utf16": (
        "a.jsonl",
        '{"text": "a"}\n'.encode("utf-16"),
        {},
        ["the file starts with a UTF-16 byte-order mark", "iconv -f UTF-16"],
    ),
    "crlf": (
        "a.jsonl",
        b'{"text": "a"}\r\n{"text": "b"}\r\n',
        {},
        ["line 1: ends in CRLF (Windows line endings; 2 lines do)", "--allow-crlf"],
    ),
    "chat_bad_role": (
        "a.jsonl",
        jsonl([{"messages": CHAT}, {"messages": BAD_CHAT}]),
        {},
        ["line 2, column 'messages': message 1 (0-based) has the role 'bot'"],
    ),
    "chat_content_not_string": (
        "a.jsonl",
        jsonl([{"messages": [{"role": "user", "content": ["hi"]}]}]),
        {},
        ["line 1, column 'messages': message 0 (0-based) has a content that is an array"],
    ),
    "chat_missing_content": (
        "a.jsonl",
        jsonl([{"messages": [{"role": "user"}]}]),
        {},
        ["line 1, column 'messages': message 0 (0-based) has no 'content'"],
    ),
    "chat_extra_key": (
        "a.jsonl",
        jsonl([{"messages": [{"role": "tool", "content": "1", "tool_call_id": "c1"}]}]),
        {},
        ["line 1, column 'messages': message 0 (0-based) has the key 'tool_call_id'"],
    ),
    "chat_empty": (
        "a.jsonl",
        jsonl([{"messages": CHAT}, {"messages": []}]),
        {},
        ["line 2, column 'messages': an empty conversation"],
    ),
    "chat_not_a_list": (
        "a.jsonl",
        jsonl([{"messages": CHAT}, {"messages": "hi"}]),
        {},
        ["line 2, column 'messages': string, not chat messages"],
    ),
    "chat_nul_in_content": (
        "a.jsonl",
        jsonl([{"messages": [{"role": "user", "content": "a\u0000"}]}]),
        {},
        ["line 1, column 'messages': message 0 (0-based) content holds the control character"],
    ),
    "csv_field_count": (
        "a.csv",
        b"text,label\nhello,1\nhello, world,2\n",
        {},
        ["line 3: 3 fields, but the header has 2", "quote values"],
    ),
    "csv_empty_cell": (
        "a.csv",
        b"text,label\nhello,1\n,2\n",
        {},
        ["line 3, column 'text': is empty, and it is a text column"],
    ),
    "csv_bad_quote": (
        "a.csv",
        b'text,label\n"unterminated,1\n',
        {},
        ["line 2: not valid CSV (unexpected end of data, at line 2)", "never closed"],
    ),
    "csv_invalid_utf8": (
        "a.csv",
        b"text\nna\xefve\n",
        {},
        ["line 2, byte offset 7 of the file (2 into the line)", "not valid UTF-8"],
    ),
    "csv_duplicate_header": (
        "a.csv",
        b"text,text\na,b\n",
        {},
        ["1 problem,", "line 1: the header names 'text' twice (columns 1 and 2)"],
    ),
    "empty_file": ("a.jsonl", b"\n\n", {}, ["no rows"]),
    "not_parquet": ("a.parquet", b"PAR1 not really", {}, ["not a readable parquet file"]),
    "unknown_suffix": ("a.txt", b"text\nhi\n", {}, ["cannot tell the format", "--format"]),
    "json_array_items": (
        "a.json",
        b'[{"text": "a"}, 3]',
        {"format": "json"},
        ["item 1 (0-based): a JSON number, not an object"],
    ),
    "text_not_text": (
        "a.jsonl",
        jsonl([{"text": "a", "n": 1}]),
        {"text": ["n"]},
        ["line 1, column 'n': holds integer, not text (a --text column)"],
    ),
}


def write_fixture(folder: Path, case: str) -> tuple[Path, dict[str, Any], list[str]]:
    filename, data, options, expected = MALFORMED[case]
    path = folder / case / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path, options, expected


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_is_refused_and_nothing_written(
    case: str, data_dir: Path, tmp_path: Path
) -> None:
    path, options, expected = write_fixture(tmp_path, case)
    with pytest.raises(ImportRefused) as refused:
        import_file(path, "target", **options)
    message = str(refused.value)
    assert message.startswith(f"cannot import {path}")
    assert "nothing was written" in message
    for text in expected:
        assert text in message
    assert list_datasets() == []
    assert not (data_dir / "target").exists()


def test_oversized_value_is_not_echoed(data_dir: Path, tmp_path: Path) -> None:
    path, options, _ = write_fixture(tmp_path, "oversized")
    with pytest.raises(ImportRefused) as refused:
        import_file(path, "target", **options)
    message = str(refused.value)
    assert repr(BIG[:40]) in message  # the first 40 characters name it
    assert BIG[:41] not in message and "-TAIL" not in message
    assert len(message) < 600


def test_parquet_and_hf_problems_name_the_0_based_row(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c\u0007"]}), source)
    with pytest.raises(ImportRefused) as refused:
        import_file(source, "target")
    message = str(refused.value)
    assert "row 1 (0-based), column 'text': is null" in message
    assert "row 2 (0-based), column 'text': the text holds the control character U+0007" in message
    folder = tmp_path / "hf"
    datasets.Dataset.from_list([{"messages": CHAT}, {"messages": BAD_CHAT}]).save_to_disk(
        str(folder)
    )
    with pytest.raises(ImportRefused, match=r"row 1 \(0-based\), column 'messages': message 1"):
        import_file(folder, "target")
    assert list_datasets() == []


def test_parquet_with_invalid_utf8_is_refused(data_dir: Path, tmp_path: Path) -> None:
    # a binary column relabelled as string: parquet stores bytes that are not UTF-8
    raw = pa.array([b"ok", b"\xff\xfe"], type=pa.binary())
    bad = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
    source = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": bad}), source)
    with pytest.raises(ImportRefused, match=r"row 1 \(0-based\), column 'text': the text is not"):
        import_file(source, "target")
    assert list_datasets() == []


def test_problems_are_all_reported_up_to_a_limit(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "many.jsonl"
    source.write_bytes(jsonl([{"text": ""} for _ in range(MAX_PROBLEMS + 7)]))
    with pytest.raises(ImportRefused) as refused:
        import_file(source, "target")
    error = refused.value
    assert error.total == MAX_PROBLEMS + 7 and len(error.problems) == MAX_PROBLEMS
    assert error.problems[0].startswith("line 1, column 'text'")
    assert "... and 7 more" in str(error)


def test_problems_of_different_kinds_are_reported_together(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "mixed.jsonl"
    source.write_bytes(b'{"text": "a", "n": 1}\n{bad\n{"text": "", "n": "x"}\n')
    with pytest.raises(ImportRefused) as refused:
        import_file(source, "target")
    message = str(refused.value)
    assert "3 problems" in message
    assert "line 2: not valid JSON" in message
    assert "line 3, column 'n': holds string, but line 1 holds integer" in message
    assert "line 3, column 'text': the text is empty" in message


# ---- the command ----------------------------------------------------------------------------


def test_cli_refuses_with_one_error_block(data_dir: Path, tmp_path: Path) -> None:
    path, _, expected = write_fixture(tmp_path, "invalid_json")
    result = CliRunner().invoke(app, ["import", str(path), "--name", "target"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"error: cannot import {path} (jsonl): 1 problem")
    assert expected[0] in result.stderr
    assert "Traceback" not in result.output
    assert list_datasets() == []


def test_cli_imports_and_prints_the_report(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([{"q": "a", "m": CHAT}, {"q": "a", "m": CHAT}, {"q": "b", "m": CHAT}]))
    result = CliRunner().invoke(
        app,
        ["import", str(source), "--name", "seeds", "--map", "q=instruction", "--map",
         "m=messages", "--require", "instruction,messages", "--drop-duplicates"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ref = read_dataset("seeds")
    assert f"as seeds@{ref.version}" in result.stdout
    assert "rows: 2 (1 duplicate row dropped" in result.stdout
    assert "instruction  string  (text)" in result.stdout
    assert "messages     list<item: struct<role: string, content: string>>  (chat, text)" in (
        result.stdout
    )
    assert f"sha256:{sha256_of(source)}" in result.stdout
    assert ref.to_arrow().column_names == ["instruction", "messages"]


def test_cli_bad_map_and_name_are_errors_not_tracebacks(data_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([{"q": "a"}]))
    runner = CliRunner()
    bad_map = runner.invoke(app, ["import", str(source), "--name", "x", "--map", "q"])
    assert bad_map.exit_code == 1 and "error: --map 'q': write SOURCE=TARGET" in bad_map.stderr
    bad_name = runner.invoke(app, ["import", str(source), "--name", "Bad Name"])
    assert bad_name.exit_code == 1 and "error: invalid dataset name 'Bad Name'" in bad_name.stderr
    missing = runner.invoke(app, ["import", str(tmp_path / "nope.jsonl"), "--name", "x"])
    assert missing.exit_code == 1 and "no such file or folder" in missing.stderr
    assert list_datasets() == []


def test_installed_command_prints_no_traceback(data_dir: Path, tmp_path: Path) -> None:
    """The real `flywheel` process on a few bad files: exit 1, `error:`, no traceback."""
    cases = ["invalid_utf8", "json_array", "oversized", "not_parquet"]
    flywheel = Path(sys.executable).parent / "flywheel"
    for case in cases:
        path, options, expected = write_fixture(tmp_path, case)
        extra = [f"--max-field-bytes={options['max_field_bytes']}"] if options else []
        done = subprocess.run(
            [str(flywheel), "import", str(path), "--name", "target", *extra],
            capture_output=True,
            text=True,
            env={**os.environ, "FLYWHEEL_DATA_DIR": str(data_dir)},
            timeout=120,
        )
        assert done.returncode == 1, (case, done.stdout, done.stderr)
        assert done.stderr.startswith("error: cannot import"), case
        assert expected[0] in done.stderr, case
        assert "Traceback" not in done.stderr + done.stdout, case
    assert list_datasets() == []
