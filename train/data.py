"""Training data as grain pipelines: deterministic global batches, per-process shards, resume.

:func:`load_dataset` reads ``--data`` (see :mod:`train.sources`), tokenizes it (see
:mod:`train.tokenizers`) and returns a :class:`Dataset`: fixed validation batches and a factory of
training iterators. Two kinds of training rows:

* ``windows`` (text and token files): the training ids are cut into windows of ``seq_len + 1``
  ids at a phase drawn per epoch; each epoch visits every window once in a seeded random order
  (grain's ``shuffle``, a new permutation per epoch, under ``repeat``).
* ``documents`` (``.jsonl``, ``c4``): one document per sequence, truncated or padded (weight 0 on
  padding), in file order for ``.jsonl`` (epochs repeat it) and in ``datasets``' seeded streaming
  order for C4.

Validation batches are fixed (the same at every evaluation): consecutive windows from the start of
the validation ids, or the first validation documents, a last partial batch padded with rows of
weight 0; each process holds its rows of each.

The contract, for ``windows`` and ``.jsonl``: the rows form one infinite sequence that is a pure
function of the seed, and the global batch of step ``s`` is rows ``[s * B, (s + 1) * B)`` of it
(``B = --batch-size``) whatever the number of processes: process ``p`` of ``P`` reads only rows
``s * B + p * B/P ... s * B + (p + 1) * B/P - 1`` (grain: batch by ``B/P``, take every ``P``-th batch
from the ``p``-th), and :func:`global_batch` assembles them into one sharded ``jax.Array``. So the
batch of step ``s`` is a pure function of (seed, s).

``Dataset.train_iterator(p, P)`` yields this process's batches from step 0, prefetched by grain in
background threads. Its state (``get_state()``) is grain's, ``{"next_index": k}`` after ``k``
batches, i.e. "the next batch is step k's": JSON, the same on every process, the data position to
store in a checkpoint. ``set_state`` (or :meth:`Dataset.seek` from a step alone, for checkpoints
that hold no state) puts an iterator at any step; it then yields exactly what an iterator that ran
from step 0 would.

C4 is a stream without random access: each process reads its own part (``datasets``'
``split_dataset_by_node``) in order, so its global batch depends on the process count; the state is
the same ``{"next_index": step}``, and setting it re-opens the stream after ``step * B/P`` documents.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import numpy as np

from train import sources
from train.config import Config, ConfigError
from train.tokenizers import IdTokenizer, T5Tokenizer, text_tokenizer

# Prefetch: whole local batches, made by a couple of threads (a batch is one gather or a few
# tokenizer calls; the training step is what the host waits for).
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)

Batch = dict[str, np.ndarray]  # {"tokens": int32 [b, seq_len + 1], "weights": float32 [b, seq_len]}


# ----------------------------------------------------------------------------- global batches


def local_batches(rows: grain.MapDataset, collate: Callable[[Sequence[Any]], Batch],
                  batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """This process's part of every global batch of `rows`: element ``s`` is step ``s``'s.

  The global batch of step ``s`` is rows ``[s * batch_size, (s + 1) * batch_size)``; process ``p``
  reads the ``p``-th of its ``process_count`` equal parts. ``collate`` makes a batch of rows.
  """
  local = rows.batch(local_batch_size(batch_size, process_count), batch_fn=collate)
  return local[process_index::process_count]


def local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ConfigError(f"--batch-size {batch_size} does not split over {process_count} processes")
  return batch_size // process_count


# ----------------------------------------------------------------------------- windows


def window_starts(num_tokens: int, seq_len: int, seed: int) -> grain.MapDataset:
  """Infinite rows of windows of ``seq_len + 1`` ids: row ``i`` is its window's first position.

  The ``(num_tokens - 1) // seq_len`` windows less one (the slack of the phase) are shuffled by
  grain, a new permutation per epoch (epoch ``e = i // num_windows``); all of them start at the
  epoch's phase, drawn from ``(seed, e)`` in ``[0, seq_len)``, so that epochs see different cuts.
  """
  usable = (num_tokens - 1) // seq_len
  random_phase = usable >= 2
  num_windows = usable - 1 if random_phase else usable

  @functools.lru_cache(maxsize=4)
  def phase(epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch]).integers(seq_len)) if random_phase else 0

  def start(i: int, window: int) -> int:
    return phase(i // num_windows) + int(window) * seq_len

  # grain seeds epoch e's permutation with (shuffle seed + e): a hash of the run's seed keeps the
  # epochs of nearby seeds apart.
  shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  order = grain.MapDataset.range(num_windows).shuffle(seed=shuffle_seed).repeat(None)
  return order.map_with_index(start)


def read_windows(tokens: np.ndarray, seq_len: int) -> Callable[[Sequence[int]], Batch]:
  """Collates window starts into a batch: one gather from `tokens` (memory-mapped or not)."""
  offsets = np.arange(seq_len + 1)

  def collate(starts: Sequence[int]) -> Batch:
    rows = np.asarray(tokens[np.asarray(starts)[:, None] + offsets]).astype(np.int32)
    return {"tokens": rows, "weights": np.ones((len(rows), seq_len), np.float32)}

  return collate


def window_batches(tokens: np.ndarray, seq_len: int, seed: int, batch_size: int,
                   process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Random-access training batches of windows of `tokens`: element ``s`` is step ``s``'s."""
  return local_batches(window_starts(len(tokens), seq_len, seed), read_windows(tokens, seq_len),
                       batch_size, process_index, process_count)


# ----------------------------------------------------------------------------- documents


def encode_document(ids: np.ndarray, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """One document as one sequence (no packing, as the authors): truncate or pad to seq_len + 1.

  Returns (tokens [seq_len + 1], weights [seq_len]) where a weight is 1 for a real target token.
  """
  ids = np.asarray(ids[:seq_len + 1], dtype=np.int32)
  tokens = np.full(seq_len + 1, pad_id, np.int32)
  tokens[:len(ids)] = ids
  weights = np.zeros(seq_len, np.float32)
  weights[:max(len(ids) - 1, 0)] = 1.0
  return tokens, weights


def read_documents(encode: Callable[[str], np.ndarray], seq_len: int,
                   pad_id: int) -> Callable[[Sequence[str]], Batch]:
  """Collates texts into a batch: each tokenized and encoded by :func:`encode_document`."""

  def collate(texts: Sequence[str]) -> Batch:
    rows = [encode_document(encode(text), seq_len, pad_id) for text in texts]
    return {"tokens": np.stack([r[0] for r in rows]), "weights": np.stack([r[1] for r in rows])}

  return collate


def document_batches(docs: Sequence[str], collate: Callable[[Sequence[str]], Batch],
                     batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> grain.MapDataset:
  """Random-access batches of documents in order, repeated: row ``i`` is ``docs[i % len(docs)]``."""
  rows = grain.MapDataset.source(docs).repeat(None)
  return local_batches(rows, collate, batch_size, process_index, process_count)


class DocumentStream(grain.IterDataset):
  """This process's batches of a stream of documents without random access (C4).

  ``open_docs(skip)`` returns this process's documents after the first ``skip``; batches take
  ``local_batch`` of them in order, and past the end of a finite stream it starts over (another
  epoch). The iterator's state is ``{"next_index": step}`` as for grain's own iterators; setting it
  re-opens the stream after ``step * local_batch`` documents.
  """

  def __init__(self, open_docs: Callable[[int], Iterator[str]],
               collate: Callable[[Sequence[str]], Batch], local_batch: int):
    super().__init__()
    self.open_docs, self.collate, self.local_batch = open_docs, collate, local_batch

  def __iter__(self) -> grain.DatasetIterator:
    return _DocumentStreamIterator(self)


class _DocumentStreamIterator(grain.DatasetIterator):

  def __init__(self, stream: DocumentStream):
    super().__init__()
    self._stream, self._step, self._docs = stream, 0, None

  def _open(self, skip: int) -> Iterator[str]:
    """The stream after `skip` documents; past the end of a finite stream, skip wraps around."""
    it = self._stream.open_docs(skip)
    first = next(it, None)
    if first is None:
      total = sum(1 for _ in self._stream.open_docs(0))
      if total == 0:
        raise ConfigError("the document stream has no training documents for this process")
      it = self._stream.open_docs(skip % total)
      first = next(it)
    return itertools.chain([first], it)

  def __next__(self) -> Batch:
    if self._docs is None:
      self._docs = self._open(self._step * self._stream.local_batch)
    texts = []
    while len(texts) < self._stream.local_batch:
      text = next(self._docs, None)
      if text is None:  # a finite stream starts over: another epoch
        self._docs = self._open(0)
      else:
        texts.append(text)
    self._step += 1
    return self._stream.collate(texts)

  def get_state(self) -> dict:
    return {"next_index": self._step}

  def set_state(self, state: dict) -> None:
    self._step, self._docs = int(state["next_index"]), None


# ----------------------------------------------------------------------------- validation


def _local_rows(batch_size: int, process_index: int, process_count: int) -> range:
  local = batch_size // process_count
  return range(process_index * local, (process_index + 1) * local)


def eval_batches_from_windows(tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int,
                              process_index: int = 0, process_count: int = 1) -> list[Batch]:
  """Fixed validation batches: consecutive non-overlapping windows from the start of `tokens`.

  A last partial batch is padded with rows of weight 0, so every batch has the same shape.
  """
  n = min((len(tokens) - 1) // seq_len, batch_size * num_batches)
  rows = [np.asarray(tokens[i * seq_len:i * seq_len + seq_len + 1]).astype(np.int32)
          for i in range(n)]
  return _pack_eval_rows([(r, np.ones(seq_len, np.float32)) for r in rows], seq_len, batch_size,
                         process_index, process_count)


def _pack_eval_rows(rows, seq_len, batch_size, process_index, process_count) -> list[Batch]:
  batches = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    pad = (np.zeros(seq_len + 1, np.int32), np.zeros(seq_len, np.float32))
    chunk = chunk + [pad] * (batch_size - len(chunk))
    local = [chunk[r] for r in _local_rows(batch_size, process_index, process_count)]
    batches.append({"tokens": np.stack([r[0] for r in local]),
                    "weights": np.stack([r[1] for r in local])})
  return batches


# ----------------------------------------------------------------------------- the dataset


@dataclasses.dataclass
class Dataset:
  """What the loop needs: training iterators, fixed validation batches, the vocabulary."""

  description: str
  vocab_size: int
  tokenizer: Any  # has .name, .encode(text) -> ids, .decode(ids) -> text
  val_batches: list[Batch]  # this process's part of each validation batch
  train_tokens: int | None  # None for documents
  kind: str  # "windows" or "documents"
  fingerprint: dict  # identifies the data for checkpoint compatibility
  # (process_index, process_count) -> that process's training batches, step 0 first: a MapDataset
  # (random access) or, for a stream, an IterDataset.
  train_batches: Callable[[int, int], grain.MapDataset | grain.IterDataset] = dataclasses.field(
      repr=False)

  def train_iterator(self, process_index: int | None = None,
                     process_count: int | None = None) -> grain.DatasetIterator:
    """This process's training batches from step 0 (default: this JAX process), prefetched.

    ``get_state()`` is ``{"next_index": k}`` once step ``k - 1``'s batch was returned;
    ``set_state`` of a saved state, or :meth:`seek`, resumes at that step.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    batches = self.train_batches(pi, pc)
    if isinstance(batches, grain.MapDataset):
      batches = batches.to_iter_dataset(READ_OPTIONS)
    else:
      batches = grain.experimental.ThreadPrefetchIterDataset(
          batches, prefetch_buffer_size=READ_OPTIONS.prefetch_buffer_size)
    return iter(batches)

  @staticmethod
  def seek(iterator: grain.DatasetIterator, step: int) -> None:
    """Puts a train iterator at `step` (its next batch is step's) without a saved state."""
    iterator.set_state({"next_index": int(step)})


def load_dataset(cfg: Config, workdir: Path | None = None) -> Dataset:
  """Reads, tokenizes and splits ``cfg.data``; every problem is a ConfigError naming the source."""
  workdir = Path(workdir or cfg.workdir)
  if cfg.data == "c4":
    return _load_c4(cfg)
  if Path(cfg.data).suffix in sources.DOC_SUFFIXES:
    return _load_jsonl(cfg, workdir)
  return _load_windows(cfg, workdir)


def _check_windows(name: str, tokens: np.ndarray, seq_len: int, where: str) -> None:
  if len(tokens) < seq_len + 1:
    raise ConfigError(
        f"--seq-len {seq_len} is longer than the {name} data ({len(tokens)} tokens, {where}); "
        f"a sequence needs seq_len + 1 = {seq_len + 1} tokens. Lower --seq-len"
        + (" or raise --val-fraction" if name == "validation" else "") + ".")


def _load_windows(cfg: Config, workdir: Path) -> Dataset:
  """Text (embedded corpus, file, directory) or token file: one stream of ids, cut into windows."""
  if cfg.data == "shakespeare":
    where, text, tokens = "embedded Shakespeare corpus", sources.read_embedded_corpus(), None
  else:
    path = Path(cfg.data)
    where = str(path)
    if not path.exists():
      raise ConfigError(f"data path {path} does not exist (use --data shakespeare for the embedded "
                        "corpus, or a text file, a directory of *.txt, or a .bin/.npy token file)")
    if path.is_file() and path.suffix in sources.TOKEN_SUFFIXES:
      if cfg.tokenizer not in ("auto",):
        raise ConfigError(f"--tokenizer {cfg.tokenizer} does not apply to a token file ({path})")
      text, tokens = None, sources.load_token_file(path, cfg)
    else:
      text, tokens = sources.read_text_source(path), None

  if text is not None:
    if not text.strip():
      raise ConfigError(f"the corpus at {where} is empty")
    train_text, val_text = sources.split_text(text, cfg.val_fraction)
    tok = text_tokenizer(cfg, lambda: train_text.splitlines(keepends=True), workdir)
    train_tokens, val_tokens = tok.encode(train_text), tok.encode(val_text)
  else:
    if len(tokens) == 0:
      raise ConfigError(f"the corpus at {where} is empty")
    train_tokens, val_tokens = sources.split_tokens(tokens, cfg.val_fraction)
    largest = sources.largest_id(tokens)
    if cfg.vocab_size and largest >= cfg.vocab_size:
      raise ConfigError(f"token file {where} holds ids >= --vocab-size {cfg.vocab_size}")
    tok = IdTokenizer(tokens.dtype, cfg.vocab_size or largest + 1)

  _check_windows("training", train_tokens, cfg.seq_len, where)
  _check_windows("validation", val_tokens, cfg.seq_len, where)
  vocab = int(tok.vocab_size)
  return Dataset(
      description=f"{where}: {len(train_tokens):,} train / {len(val_tokens):,} val tokens "
                  f"({tok.name} tokenizer, vocab {vocab})",
      vocab_size=vocab, tokenizer=tok,
      val_batches=eval_batches_from_windows(val_tokens, cfg.seq_len, cfg.batch_size,
                                            cfg.eval_batches, jax.process_index(),
                                            jax.process_count()),
      train_tokens=len(train_tokens), kind="windows",
      fingerprint={"data": cfg.data, "tokenizer": tok.name, "vocab": vocab,
                   "train_tokens": int(len(train_tokens)), "val_fraction": cfg.val_fraction},
      train_batches=functools.partial(window_batches, train_tokens, cfg.seq_len, cfg.seed,
                                      cfg.batch_size))


def _documents_dataset(cfg: Config, where: str, tok, val_docs: Iterator[str],
                       train_batches: Callable[[int, int], Any]) -> Dataset:
  val_rows = [encode_document(tok.encode(text), cfg.seq_len, tok.pad_id)
              for text in itertools.islice(val_docs, cfg.batch_size * cfg.eval_batches)]
  vocab = int(tok.vocab_size)
  return Dataset(
      description=f"{where}: one document per sequence ({tok.name} tokenizer, vocab {vocab})",
      vocab_size=vocab, tokenizer=tok,
      val_batches=_pack_eval_rows(val_rows, cfg.seq_len, cfg.batch_size, jax.process_index(),
                                  jax.process_count()),
      train_tokens=None, kind="documents",
      fingerprint={"data": cfg.data, "tokenizer": tok.name, "vocab": vocab,
                   "val_fraction": cfg.val_fraction},
      train_batches=train_batches)


def _load_jsonl(cfg: Config, workdir: Path) -> Dataset:
  """A .jsonl file: its training documents in file order, random access by line offset."""
  path = Path(cfg.data)
  val_every = max(2, round(1 / cfg.val_fraction))
  train_docs, val_docs = sources.jsonl_documents(path, val_every)
  tok = text_tokenizer(
      cfg, lambda: (train_docs[i] for i in range(min(len(train_docs), 100_000))), workdir)
  collate = read_documents(tok.encode, cfg.seq_len, tok.pad_id)
  return _documents_dataset(
      cfg, str(path), tok, iter(val_docs),
      functools.partial(document_batches, train_docs, collate, cfg.batch_size))


def _load_c4(cfg: Config) -> Dataset:
  """C4 streamed from the hub with the t5-base tokenizer (the paper's setup)."""
  if cfg.tokenizer not in ("auto", "t5"):
    raise ConfigError("--data c4 uses the t5-base tokenizer (--tokenizer t5)")
  tok = T5Tokenizer()
  train_docs = sources.hf_c4_docs("train", cfg.seed)
  val_docs = sources.hf_c4_docs("validation", cfg.seed)
  collate = read_documents(tok.encode, cfg.seq_len, tok.pad_id)

  def train_batches(process_index: int, process_count: int) -> DocumentStream:
    return DocumentStream(lambda skip: train_docs(skip, process_index, process_count), collate,
                          local_batch_size(cfg.batch_size, process_count))

  return _documents_dataset(cfg, "C4 (allenai/c4, en, streaming)", tok, val_docs(0, 0, 1),
                            train_batches)


def global_batch(local: Batch, sharding, batch_size: int) -> dict[str, jax.Array]:
  """This process's rows -> one global ``jax.Array`` per field, split over the batch axes."""
  out = {}
  for name, rows in local.items():
    shape = (batch_size,) + rows.shape[1:]
    out[name] = jax.make_array_from_process_local_data(sharding, rows, shape)
  return out
