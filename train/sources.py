"""Data sources (``--data``): reading a corpus and splitting it into training and validation.

* ``shakespeare`` - the embedded complete works (``train/data/shakespeare.txt.xz``, public domain).
* a text file, or a directory (every ``*.txt`` below it, sorted by path, joined by blank lines).
* a token file of ids: ``.npy`` (uint16/uint32, memory-mapped) or raw ``.bin`` (``--token-dtype``).
* a ``.jsonl`` file of documents (``{"text": ...}`` per line): every ``val_every``-th line is
  validation, the others training, in file order; lines are read by offset, when needed.
* ``c4`` - C4 (en) streamed from the Hugging Face hub (needs the ``c4`` extra and the network).

Text is split by :func:`split_text` (the last ``val_fraction``, cut at a line break), ids by
:func:`split_tokens`. Every problem with a source is a :class:`ConfigError` that names it.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from train.config import Config, ConfigError

EMBEDDED_CORPUS = Path(__file__).parent / "data" / "shakespeare.txt.xz"
TOKEN_SUFFIXES = (".bin", ".npy")
DOC_SUFFIXES = (".jsonl",)


# ----------------------------------------------------------------------------- text


def read_embedded_corpus() -> str:
  with lzma.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
    return f.read()


def read_text_source(path: Path) -> str:
  """The text of a file, or of every ``*.txt`` file below a directory (sorted)."""
  if path.is_dir():
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
      raise ConfigError(f"no *.txt files found in data directory {path}")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in files)
  return path.read_text(encoding="utf-8", errors="replace")


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
  """Last `val_fraction` of the text is validation, cut at the next line break."""
  cut = int(len(text) * (1 - val_fraction))
  newline = text.find("\n", cut)
  if newline != -1 and newline < len(text) - 1:
    cut = newline + 1
  return text[:cut], text[cut:]


# ----------------------------------------------------------------------------- token files


def load_token_file(path: Path, cfg: Config) -> np.ndarray:
  """The ids of a ``.npy`` or ``.bin`` file, memory-mapped (nothing is read until used)."""
  if path.suffix == ".npy":
    try:
      tokens = np.load(path, mmap_mode="r")
    except ValueError as e:
      raise ConfigError(f"cannot read token file {path}: {e}") from e
    if tokens.dtype not in (np.uint16, np.uint32) or tokens.ndim != 1:
      raise ConfigError(f"token file {path} must hold a 1-D uint16 or uint32 array, got "
                        f"{tokens.dtype} with shape {tokens.shape}")
    return tokens
  dtype = np.dtype(cfg.token_dtype)
  size = path.stat().st_size
  if size % dtype.itemsize:
    raise ConfigError(f"token file {path} has {size} bytes, not a multiple of {dtype.itemsize} "
                      f"({dtype.name}); is --token-dtype right?")
  if size == 0:
    raise ConfigError(f"the corpus at {path} is empty")
  return np.memmap(path, dtype=dtype, mode="r")


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Last `val_fraction` of the ids is validation (views: a memory map stays one)."""
  cut = int(len(tokens) * (1 - val_fraction))
  return tokens[:cut], tokens[cut:]


def largest_id(tokens: np.ndarray) -> int:
  """The largest id, read in chunks (a memory-mapped file is never loaded whole)."""
  chunk = 1 << 24
  return max(int(np.max(tokens[i:i + chunk])) for i in range(0, len(tokens), chunk))


# ----------------------------------------------------------------------------- documents


class JsonlDocuments(Sequence[str]):
  """Some documents of a .jsonl file, by index: the ``"text"`` of the lines at ``offsets``.

  The file is scanned once for line offsets; a document is read (and parsed) when asked for, so a
  file of any size costs 16 bytes per line in memory. Safe to use from several threads.
  """

  def __init__(self, path: Path, offsets: np.ndarray, lengths: np.ndarray):
    self.path, self.offsets, self.lengths = path, offsets, lengths

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, index: int) -> str:
    with self.path.open("rb") as f:
      f.seek(int(self.offsets[index]))
      return json.loads(f.read(int(self.lengths[index])))["text"]


def jsonl_documents(path: Path, val_every: int) -> tuple[JsonlDocuments, JsonlDocuments]:
  """(training, validation) documents of a .jsonl file: every `val_every`-th line is validation.

  Blank lines hold no document but count as lines.
  """
  if not path.is_file():
    raise ConfigError(f"data path {path} does not exist")
  spans: tuple[list, list] = ([], [])
  with path.open("rb") as f:
    offset = 0
    for line_no, line in enumerate(f):
      if line.strip():
        spans[line_no % val_every == val_every - 1].append((offset, len(line)))
      offset += len(line)
  train, val = (np.asarray(s, dtype=np.int64).reshape(-1, 2) for s in spans)
  if not len(train) or not len(val):
    raise ConfigError(f"the corpus at {path} is empty or has too few documents for a "
                      f"validation split (every {val_every}th line)")
  return (JsonlDocuments(path, train[:, 0], train[:, 1]),
          JsonlDocuments(path, val[:, 0], val[:, 1]))


def hf_c4_docs(split: str, seed: int) -> Callable[[int, int, int], Iterator[str]]:
  """C4 (en) streamed from the hub: ``open_docs(skip, process_index, process_count)``.

  The training split is shuffled as the authors did (``datasets``' seeded shard order and buffer),
  split by process with ``split_dataset_by_node``, and read after the first ``skip`` documents of
  this process's part (a resume re-reads and drops them).
  """

  def open_docs(skip: int, process_index: int, process_count: int) -> Iterator[str]:
    try:
      import datasets
      from datasets.distributed import split_dataset_by_node
    except ImportError as e:  # pragma: no cover - optional extra
      raise ConfigError("--data c4 needs the 'c4' extra: pip install 'spam-optax[c4]'") from e
    ds = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
    if split == "train":
      ds = ds.shuffle(seed=seed)
    ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)
    if skip:
      ds = ds.skip(skip)
    return (row["text"] for row in ds)

  return open_docs
