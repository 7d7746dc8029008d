"""Sources: JSONL / Parquet reading, bad rows, errors, sharding, epochs, exact resume."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1jax.data import sources


def _rows(n, start=0):
  return [{"prompt": f"{i}+1", "answer": str(i + 1), "task": "arithmetic"}
          for i in range(start, start + n)]


def _write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def _prompts(batch):
  return [r["prompt"] for r in batch]


def test_reads_jsonl_parquet_and_globs(tmp_path):
  _write_jsonl(tmp_path / "a.jsonl", _rows(3))
  pq.write_table(pa.Table.from_pylist(_rows(2, start=3)), tmp_path / "b.parquet")
  source = sources.read_records(str(tmp_path / "*"))
  assert len(source) == 5 and source.stats.bad_rows == 0
  assert [source[i]["prompt"] for i in range(5)] == [f"{i}+1" for i in range(5)]
  assert len(sources.read_records(str(tmp_path))) == 5  # a folder
  assert len(sources.read_records([str(tmp_path / "b.parquet")])) == 2


def test_field_mapping_and_numeric_answers(tmp_path):
  rows = [{"question": "2+2", "meta": {"final": 4}}]
  path = _write_jsonl(tmp_path / "q.jsonl", rows)
  source = sources.read_records(path, fields={"prompt": "question", "answer": "meta.final"})
  assert source[0]["prompt"] == "2+2" and source[0]["answer"] == "4"
  assert source[0]["question"] == "2+2"  # original columns are kept


def test_bad_rows_are_counted_and_skipped(tmp_path):
  rows = _rows(2) + [
      "{not json", json.dumps([1, 2]),
      {"answer": "1"},                      # missing prompt
      {"prompt": 5, "answer": "1"},         # wrong type
      {"prompt": "   ", "answer": "1"},     # empty prompt
      {"prompt": "x" * 50, "answer": "1"},  # too long
      {"prompt": "1+1", "answer": True},    # wrong answer type
      {"prompt": "1+1"},                    # missing answer
  ] + _rows(1, start=9)
  path = _write_jsonl(tmp_path / "d.jsonl", rows)
  source = sources.read_records(path, max_prompt_chars=48)
  assert len(source) == 3
  assert source.stats.bad_rows == 8
  reasons = source.stats.bad_by_reason
  assert reasons["missing field 'prompt'"] == 1 and reasons["missing field 'answer'"] == 1
  assert reasons["field 'prompt': empty prompt"] == 1
  assert reasons["field 'prompt': prompt longer than max_prompt_chars=48"] == 1
  assert sum(v for k, v in reasons.items() if "invalid JSON" in k) == 1


def test_bad_rows_error_names_file_and_row(tmp_path):
  path = _write_jsonl(tmp_path / "d.jsonl", _rows(2) + [{"prompt": "", "answer": "1"}])
  with pytest.raises(sources.BadRowError, match=r"d\.jsonl:3: field 'prompt': empty prompt"):
    sources.read_records(path, bad_rows="error")
  with pytest.raises(ValueError, match="bad_rows="):
    sources.read_records(path, bad_rows="ignore")


def test_missing_and_empty_datasets(tmp_path):
  with pytest.raises(FileNotFoundError, match="no data file matches"):
    sources.read_records(str(tmp_path / "nope*.jsonl"))
  with pytest.raises(FileNotFoundError, match="holds no"):
    sources.read_records(str(tmp_path))
  empty = _write_jsonl(tmp_path / "e.jsonl", [])
  with pytest.raises(ValueError, match="no usable rows"):
    sources.read_records(empty)
  all_bad = _write_jsonl(tmp_path / "f.jsonl", [{"prompt": ""}])
  with pytest.raises(ValueError, match=r"no usable rows \(1 bad rows"):
    sources.read_records(all_bad)
  (tmp_path / "g.csv").write_text("prompt,answer\n")
  with pytest.raises(ValueError, match="unknown data format"):
    sources.read_records(str(tmp_path / "g.csv"))
  with pytest.raises(ValueError, match="no usable rows"):
    sources.from_records([])


def test_in_memory_source_and_messages():
  rows = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": []}]
  source = sources.from_records(rows, required=("messages",))
  assert len(source) == 1 and source.stats.bad_rows == 1
  with pytest.raises(ValueError, match="unknown field names"):
    sources.from_records(rows, required=("question",))


def test_epochs_shuffle_and_batches():
  source = sources.from_records(_rows(10))
  batches = list(sources.make_iterator(source, 5, seed=1, num_epochs=2, shard_index=0,
                                       shard_count=1))
  assert len(batches) == 4 and all(len(b) == 5 for b in batches)
  first, second = _prompts(batches[0] + batches[1]), _prompts(batches[2] + batches[3])
  assert sorted(first) == sorted(second) == sorted(r["prompt"] for r in _rows(10))
  assert first != second  # each epoch is shuffled anew
  again = list(sources.make_iterator(source, 5, seed=1, num_epochs=2, shard_index=0,
                                     shard_count=1))
  assert [_prompts(b) for b in again] == [_prompts(b) for b in batches]
  other_seed = next(sources.make_iterator(source, 5, seed=2, shard_index=0, shard_count=1))
  assert _prompts(other_seed) != _prompts(batches[0])
  plain = next(sources.make_iterator(source, 5, shuffle=False, shard_index=0, shard_count=1))
  assert _prompts(plain) == [f"{i}+1" for i in range(5)]


def test_host_shards_are_disjoint_and_equal():
  source = sources.from_records(_rows(11))
  shards = [[r["prompt"] for b in sources.make_iterator(source, 1, num_epochs=1, shard_index=i,
                                                         shard_count=3) for r in b]
            for i in range(3)]
  assert [len(s) for s in shards] == [3, 3, 3]
  assert len(set().union(*shards)) == 9
  default = list(sources.make_iterator(source, 11, num_epochs=1))  # one process: whole set
  assert len(default) == 1
  with pytest.raises(ValueError, match="shard_index"):
    sources.make_iterator(source, 1, shard_index=3, shard_count=3)
  with pytest.raises(ValueError, match="cannot be split"):
    sources.make_iterator(sources.from_records(_rows(2)), 1, shard_index=0, shard_count=3)


def test_resume_gives_the_exact_next_batch():
  source = sources.from_records(_rows(13))
  kwargs = dict(seed=7, shard_index=0, shard_count=1)
  uninterrupted = sources.make_iterator(source, 4, **kwargs)
  reference = [_prompts(next(uninterrupted)) for _ in range(10)]  # crosses epochs

  interrupted = sources.make_iterator(source, 4, **kwargs)
  for _ in range(5):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.get_state()))  # survives serialisation
  resumed = sources.make_iterator(source, 4, **kwargs)
  resumed.set_state(state)
  assert [_prompts(next(resumed)) for _ in range(5)] == reference[5:]
