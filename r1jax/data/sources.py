"""Prompt datasets as grain pipelines: JSONL / Parquet files or in-memory records.

Rows are read and checked once, when the source is built: a bad row (missing field,
wrong type, empty or too long prompt, broken JSON) is counted and skipped, or raises
one error naming file and row, so nothing fails halfway through a run. Records are then
served by a grain MapDataset: shard per host, shuffle (a new order each epoch), repeat,
batch. Every step is an index computation, so the iterator state is one integer and a
restored iterator yields exactly the batch the interrupted run would have.

Rows are held in memory; that suits prompt sets (RL and SFT prompts are at most a few
million short rows), not pre-training corpora.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import grain

FIELDS = ("prompt", "answer", "solution", "messages")
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}

log = logging.getLogger(__name__)


class BadRowError(ValueError):
  """A malformed row, with bad_rows='error'."""


@dataclasses.dataclass
class LoadStats:
  """What loading kept and skipped; `bad_by_reason` maps a reason to a count."""
  rows: int = 0
  bad_rows: int = 0
  bad_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)


class RecordSource:
  """Checked records (dicts) with random access: a grain data source.

  Each record keeps its original fields and gains the canonical names of FIELDS
  ('prompt', 'answer', ...) taken from the configured columns.
  """

  def __init__(self, records: list[dict], stats: LoadStats, name: str):
    self.records, self.stats, self.name = records, stats, name

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    return self.records[index]

  def __repr__(self) -> str:
    return f"RecordSource({self.name}, rows={len(self)}, bad_rows={self.stats.bad_rows})"


def read_records(paths: str | Sequence[str], *, fields: Mapping[str, str] | None = None,
                 required: Sequence[str] = ("prompt", "answer"), bad_rows: str = "skip",
                 max_prompt_chars: int | None = None) -> RecordSource:
  """Reads JSONL / Parquet files into a checked RecordSource.

  Args:
    paths: a file, a folder (its .jsonl/.json/.parquet files), a glob, or a list of them.
    fields: canonical name -> column, e.g. {'prompt': 'question'}; a dotted column
      ('extra.question') reads a nested value. Unlisted names use their own column.
    required: the canonical fields a row must have.
    bad_rows: 'skip' (count them, log a summary) or 'error' (raise on the first one).
    max_prompt_chars: rows with longer prompts are bad rows.
  """
  files = _expand(paths)
  checker = _RowChecker(fields, required, bad_rows, max_prompt_chars)
  records = []
  for file in files:
    for row_number, row in _read_rows(file):
      record = checker(row, where=f"{file}:{row_number}")
      if record is not None:
        records.append(record)
  return checker.finish(records, name=", ".join(files))


def from_records(rows: Iterable[Any], *, fields: Mapping[str, str] | None = None,
                 required: Sequence[str] = ("prompt", "answer"), bad_rows: str = "skip",
                 max_prompt_chars: int | None = None, name: str = "memory") -> RecordSource:
  """An in-memory RecordSource (e.g. the synthetic tasks), checked like files are."""
  checker = _RowChecker(fields, required, bad_rows, max_prompt_chars)
  records = []
  for i, row in enumerate(rows):
    record = checker(row, where=f"{name}[{i}]")
    if record is not None:
      records.append(record)
  return checker.finish(records, name=name)


def make_dataset(source: RecordSource, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, shard_index: int | None = None,
                 shard_count: int | None = None, drop_remainder: bool = True,
                 read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """The batched pipeline: shard -> shuffle -> repeat -> batch; a batch is a list of dicts.

  Args:
    num_epochs: passes over this host's shard; None repeats forever.
    shard_index / shard_count: this host's slice; default jax.process_index() /
      jax.process_count(). Every shard gets the same number of rows (the remainder is
      dropped) so all hosts run the same number of steps and none waits on a collective.
      The stage loops pass 0 / 1 instead: every host reads the global batch and feeds
      its own rows of it (r1jax.session.global_iterator).
    read_options: grain reader threads / prefetch; default synchronous.
  """
  if shard_index is None or shard_count is None:
    import jax
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  per_shard = len(source) // shard_count
  if per_shard == 0:
    raise ValueError(f"{source.name}: {len(source)} rows cannot be split over {shard_count} hosts")
  if drop_remainder and num_epochs is not None and per_shard * num_epochs < batch_size:
    raise ValueError(f"{source.name}: {per_shard} rows per host x {num_epochs} epochs is less "
                     f"than one batch of {batch_size}")
  ds = grain.MapDataset.source(source)[:per_shard * shard_count][shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)  # reseeded per epoch by repeat()
  ds = ds.repeat(num_epochs)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)
  # Rows are already in memory, so reader threads would only add start-up cost and
  # prefetch hundreds of batches; read synchronously unless asked otherwise.
  read_options = read_options or grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return ds.to_iter_dataset(read_options)


def make_iterator(source: RecordSource, batch_size: int, **kwargs) -> grain.DatasetIterator:
  """An iterator over make_dataset(...) batches; get_state() / set_state() resume it."""
  return iter(make_dataset(source, batch_size, **kwargs))


# -------------------------------------------------------------------------- internals

def _expand(paths: str | Sequence[str]) -> list[str]:
  """Files named by paths, folders and globs, in a stable (sorted) order."""
  patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  if not patterns:
    raise ValueError("no data path given")
  files = []
  for pattern in map(str, patterns):
    if os.path.isdir(pattern):
      found = sorted(f for f in glob.glob(os.path.join(pattern, "*"))
                     if os.path.splitext(f)[1] in _FORMATS)
      if not found:
        raise FileNotFoundError(f"folder {pattern!r} holds no .jsonl, .json or .parquet files")
    else:
      found = sorted(glob.glob(pattern))
      if not found:
        raise FileNotFoundError(f"no data file matches {pattern!r}")
    for f in found:
      if os.path.splitext(f)[1] not in _FORMATS:
        raise ValueError(f"{f}: unknown data format; use .jsonl (one JSON object a line) "
                         f"or .parquet")
    files += found
  return files


def _read_rows(file: str) -> Iterable[tuple[int, Any]]:
  """(1-based row number, row) pairs; a line that is not JSON yields an _Invalid row."""
  if _FORMATS[os.path.splitext(file)[1]] == "parquet":
    import pyarrow.parquet as pq
    try:
      table = pq.read_table(file)
    except Exception as e:  # pyarrow raises several types for a damaged file
      raise ValueError(f"{file}: not a readable Parquet file: {e}") from None
    for i, row in enumerate(table.to_pylist(), start=1):
      yield i, row
    return
  with open(file, encoding="utf-8") as f:
    for i, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield i, json.loads(line)
      except json.JSONDecodeError as e:
        yield i, _Invalid(f"invalid JSON ({e.msg})")


@dataclasses.dataclass
class _Invalid:
  reason: str


class _RowChecker:
  """Turns raw rows into records, counting or raising on bad ones."""

  def __init__(self, fields, required, bad_rows, max_prompt_chars):
    if bad_rows not in ("skip", "error"):
      raise ValueError(f"bad_rows={bad_rows!r}: choose 'skip' or 'error'")
    unknown = (set(fields or {}) | set(required)) - set(FIELDS)
    if unknown:
      raise ValueError(f"unknown field names {sorted(unknown)}: the fields are {FIELDS}")
    self.columns = {name: (fields or {}).get(name, name) for name in FIELDS}
    self.required, self.bad_rows, self.max_prompt_chars = required, bad_rows, max_prompt_chars
    self.reasons = collections.Counter()

  def __call__(self, row: Any, where: str) -> dict | None:
    record, reason = self._check(row)
    if reason is None:
      return record
    if self.bad_rows == "error":
      raise BadRowError(f"{where}: {reason} (pass bad_rows='skip' to skip such rows)")
    self.reasons[reason] += 1
    return None

  def finish(self, records: list[dict], name: str) -> RecordSource:
    bad = sum(self.reasons.values())
    stats = LoadStats(rows=len(records), bad_rows=bad, bad_by_reason=dict(self.reasons))
    summary = ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common())
    if not records:
      raise ValueError(f"{name}: no usable rows" + (f" ({bad} bad rows: {summary})" if bad else ""))
    if bad:
      log.warning("%s: skipped %d bad rows of %d (%s)", name, bad, bad + len(records), summary)
    return RecordSource(records, stats, name)

  def _check(self, row: Any) -> tuple[dict | None, str | None]:
    if isinstance(row, _Invalid):
      return None, row.reason
    if not isinstance(row, dict):
      return None, f"row is a {type(row).__name__}, not an object"
    record = dict(row)
    for name, column in self.columns.items():
      value = _lookup(row, column)
      if value is _MISSING:
        if name in self.required:
          return None, f"missing field {column!r}"
        continue
      value, reason = _check_value(name, value, self.max_prompt_chars)
      if reason is not None:
        if name in self.required:
          return None, f"field {column!r}: {reason}"
        continue  # a malformed optional field is dropped, not trusted
      record[name] = value
    return record, None


_MISSING = object()


def _lookup(row: dict, column: str) -> Any:
  value = row
  for part in column.split("."):
    if not isinstance(value, dict) or part not in value or value[part] is None:
      return _MISSING
    value = value[part]
  return value


def _check_value(name: str, value: Any, max_prompt_chars: int | None) -> tuple[Any, str | None]:
  """(normalised value, None) or (None, reason)."""
  if name == "prompt":
    if not isinstance(value, str):
      return None, f"prompt is a {type(value).__name__}, not a string"
    if not value.strip():
      return None, "empty prompt"
    if max_prompt_chars is not None and len(value) > max_prompt_chars:
      return None, f"prompt longer than max_prompt_chars={max_prompt_chars}"
    return value, None
  if name == "answer":
    # Numbers are accepted (e.g. a countdown target) and kept as their text.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
      return None, f"answer is a {type(value).__name__}, not a string or number"
    value = str(value)
    return (value, None) if value.strip() else (None, "empty answer")
  if name == "solution":
    if not isinstance(value, str):
      return None, f"solution is a {type(value).__name__}, not a string"
    return value, None
  # messages
  ok = (isinstance(value, list) and value and all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in value))
  return (value, None) if ok else (None, "messages is not a non-empty list of {role, content}")
