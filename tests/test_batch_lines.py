"""Batch input parsing and resume bookkeeping (the end-to-end runs are in tests/e2e)."""

import json

import pytest

from dscluster.batch import check_batch_files, iter_lines, parse_line, read_done_ids, result_record
from dscluster.errors import UsageError


def test_openai_batch_line():
    line = parse_line(3, json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                     "body": {"prompt": "hi"}}))
    assert (line.custom_id, line.url, line.body, line.problem) == ("a", "/v1/completions", {"prompt": "hi"}, None)


def test_predict_line_with_id():
    line = parse_line(1, '{"id": 7, "inputs": [[1.0, 2.0]]}')
    assert (line.custom_id, line.url, line.body) == ("7", "/v1/predict", {"inputs": [[1.0, 2.0]]})


@pytest.mark.parametrize("text,needle", [
    ("{not json", "line 4: not valid JSON"),
    ("[1, 2]", "line 4: expected a JSON object"),
    ('{"custom_id": "", "url": "/v1/completions", "body": {}}', "custom_id must be a non-empty string"),
    ('{"custom_id": "x", "url": "/v1/embeddings", "body": {}}', "url '/v1/embeddings' is not one of"),
    ('{"custom_id": "x", "method": "GET", "url": "/v1/completions", "body": {}}', "method 'GET' is not POST"),
    ('{"custom_id": "x", "url": "/v1/completions", "body": "hi"}', "body must be a JSON object"),
    ('{"inputs": [[1.0]]}', 'a predict line needs an "id"'),
    ('{"id": "x", "inputs": [[NaN]]}', "NaN is not a finite number"),
    ('{"hello": 1}', "neither an OpenAI batch request"),
])
def test_bad_lines_name_the_problem_and_line(text, needle):
    line = parse_line(4, text)
    assert line.problem is not None and needle in line.problem
    record = result_record(line, None, None)
    assert record["response"] is None and needle in record["error"]["message"]


def test_duplicate_ids_are_reported_once(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "inputs": [[1.0]]}\n\n{"id": "a", "inputs": [[2.0]]}\n')
    lines = list(iter_lines(src))
    assert [line.custom_id for line in lines] == ["a", "line-3"]
    assert "id 'a' already used on line 1" in lines[1].problem


def test_resume_drops_a_cut_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"custom_id": "a", "response": null, "error": null}\n{"custom_id": "b", "resp')
    assert read_done_ids(out) == {"a"}
    assert out.read_text().endswith("null}\n")


def test_resume_refuses_a_foreign_output(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("hello\n")
    with pytest.raises(UsageError, match="not a dscluster batch result"):
        read_done_ids(out)


def test_files_checked_before_any_rank_starts(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        check_batch_files(str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl"))
    src = tmp_path / "in.jsonl"
    src.write_text("")
    with pytest.raises(UsageError, match="does not exist"):
        check_batch_files(str(src), str(tmp_path / "no" / "out.jsonl"))
    with pytest.raises(UsageError, match="is a directory"):
        check_batch_files(str(src), str(tmp_path))
