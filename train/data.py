"""Training data: corpora, tokenizers, deterministic batches, and per-process shards.

Sources (``--data``):

* ``shakespeare`` - the embedded complete works (``train/data/shakespeare.txt.xz``, public domain).
* a text file, or a directory (every ``*.txt`` below it, sorted by path, joined by blank lines).
* a token file of ids: ``.npy`` (uint16/uint32, memory-mapped) or raw ``.bin`` (``--token-dtype``).
* a ``.jsonl`` file of documents (``{"text": ...}`` per line): one document per sequence, padded, as
  the paper's C4 pipeline.
* ``c4`` - C4 (en) streamed from the Hugging Face hub with the t5-base tokenizer (the paper's setup;
  needs the ``c4`` extra and the network). It shares the document code path with ``.jsonl``.

Text and token sources are one stream of ids, split deterministically: the last ``val_fraction`` is
validation (for text, cut at a line break). Training sequences are windows of ``seq_len + 1`` ids;
each epoch visits every window once in a seeded random order (with a seeded phase), so the batch of
step ``s`` is a pure function of (seed, s): resuming needs only the step. Each process reads only its
own rows of every global batch; :func:`global_batch` assembles them into one sharded ``jax.Array``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import lzma
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import numpy as np

from train.config import Config, ConfigError

EMBEDDED_CORPUS = Path(__file__).parent / "data" / "shakespeare.txt.xz"
TOKEN_SUFFIXES = (".bin", ".npy")
DOC_SUFFIXES = (".jsonl",)


# ----------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
  """UTF-8 bytes as ids: vocabulary 256, nothing to train or download."""

  name = "byte"
  vocab_size = 256
  pad_id = 0

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

  def decode(self, ids) -> str:
    return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


class BPETokenizer:
  """Byte-level BPE trained locally with the ``tokenizers`` package (saved to the workdir)."""

  name = "bpe"
  pad_id = 0

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size()

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
    try:
      from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise ConfigError("--tokenizer bpe needs the 'tokenizers' package "
                        "(pip install 'spam-optax[bpe]')") from e
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, special_tokens=["<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return cls(tok)

  @classmethod
  def load(cls, path: Path) -> "BPETokenizer":
    from tokenizers import Tokenizer
    return cls(Tokenizer.from_file(str(path)))

  def save(self, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    self.tokenizer.save(str(tmp))
    os.replace(tmp, path)

  def encode(self, text: str) -> np.ndarray:
    # Encode line by line in batches: one giant string would be slow and memory hungry.
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for start in range(0, len(lines), 4096):
      for enc in self.tokenizer.encode_batch(lines[start:start + 4096]):
        ids.extend(enc.ids)
    dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
    return np.asarray(ids, dtype=dtype)

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids])


class T5Tokenizer:
  """The t5-base SentencePiece tokenizer the paper used for C4 (needs ``transformers``)."""

  name = "t5"
  vocab_size = 32000  # the paper's LLaMA vocab; t5-base's 100 sentinel ids map to <unk>
  pad_id = 0
  unk_id = 2

  def __init__(self):
    try:
      from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - optional extra
      raise ConfigError("--data c4 needs the 'c4' extra: pip install 'spam-optax[c4]'") from e
    self.tokenizer = AutoTokenizer.from_pretrained("t5-base", model_max_length=1 << 30)

  def encode(self, text: str) -> np.ndarray:
    ids = np.asarray(self.tokenizer(text)["input_ids"], dtype=np.uint32)
    return np.where(ids < self.vocab_size, ids, self.unk_id).astype(np.uint16)

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids])


# ----------------------------------------------------------------------------- samplers


def _local_rows(batch_size: int, process_index: int, process_count: int) -> range:
  local = batch_size // process_count
  return range(process_index * local, (process_index + 1) * local)


class WindowSampler:
  """Batches of windows of ``seq_len + 1`` ids from one token array (in memory or memory-mapped).

  Global sample ``i`` (``i = step * batch_size + row``) is window ``perm_e[i % W]`` of epoch
  ``e = i // W`` at phase ``phase_e``; the permutation and phase are drawn from ``(seed, e)``.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
    self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
    usable = (len(tokens) - 1) // seq_len
    self.random_phase = usable >= 2
    self.num_windows = usable - 1 if self.random_phase else usable
    self._epochs: dict[int, tuple[np.ndarray, int]] = {}

  def _epoch(self, e: int) -> tuple[np.ndarray, int]:
    if e not in self._epochs:
      rng = np.random.default_rng([self.seed, e])
      perm = rng.permutation(self.num_windows)
      phase = int(rng.integers(self.seq_len)) if self.random_phase else 0
      if len(self._epochs) >= 2:
        self._epochs.pop(min(self._epochs))
      self._epochs[e] = (perm, phase)
    return self._epochs[e]

  def batch(self, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    rows = []
    for r in _local_rows(batch_size, process_index, process_count):
      i = step * batch_size + r
      perm, phase = self._epoch(i // self.num_windows)
      start = phase + int(perm[i % self.num_windows]) * self.seq_len
      rows.append(np.asarray(self.tokens[start:start + self.seq_len + 1]))
    tokens = np.stack(rows).astype(np.int32)
    return {"tokens": tokens, "weights": np.ones(tokens[:, 1:].shape, np.float32)}


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


class DocumentStream:
  """Sequential batches of one-document sequences from a stream of texts (C4 or a .jsonl file).

  ``open_docs(skip)`` returns an iterator over *this process's* documents after the first ``skip``
  of them. The stream is read in order; asking for a step other than the next one (a resume)
  reopens it at ``step * local_batch`` documents.
  """

  def __init__(self, open_docs: Callable[[int], Iterator[str]], encode: Callable[[str], np.ndarray],
               seq_len: int, pad_id: int):
    self.open_docs, self.encode, self.seq_len, self.pad_id = open_docs, encode, seq_len, pad_id
    self._iter: Iterator[str] | None = None
    self._next_step = None

  def _open(self, skip: int) -> Iterator[str]:
    """The stream after `skip` documents; past the end of a finite stream, skip wraps around."""
    it = self.open_docs(skip)
    first = next(it, None)
    if first is None:
      total = sum(1 for _ in self.open_docs(0))
      if total == 0:
        raise ConfigError("the document stream has no training documents for this process")
      it = self.open_docs(skip % total)
      first = next(it)
    return itertools.chain([first], it)

  def batch(self, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    local = len(_local_rows(batch_size, process_index, process_count))
    if self._iter is None or step != self._next_step:
      self._iter = self._open(step * local)
    rows = []
    for _ in range(local):
      try:
        text = next(self._iter)
      except StopIteration:  # a finite stream (jsonl) starts over: another epoch
        self._iter = self._open(0)
        text = next(self._iter)
      rows.append(encode_document(self.encode(text), self.seq_len, self.pad_id))
    self._next_step = step + 1
    return {"tokens": np.stack([r[0] for r in rows]), "weights": np.stack([r[1] for r in rows])}


def eval_batches_from_windows(tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int,
                              process_index: int = 0, process_count: int = 1) -> list[dict]:
  """Fixed validation batches: consecutive non-overlapping windows from the start of `tokens`.

  A last partial batch is padded with rows of weight 0, so every batch has the same shape.
  """
  n = min((len(tokens) - 1) // seq_len, batch_size * num_batches)
  rows = [np.asarray(tokens[i * seq_len:i * seq_len + seq_len + 1]).astype(np.int32)
          for i in range(n)]
  return _pack_eval_rows([(r, np.ones(seq_len, np.float32)) for r in rows], seq_len, batch_size,
                         process_index, process_count)


def _pack_eval_rows(rows, seq_len, batch_size, process_index, process_count) -> list[dict]:
  batches = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    pad = (np.zeros(seq_len + 1, np.int32), np.zeros(seq_len, np.float32))
    chunk = chunk + [pad] * (batch_size - len(chunk))
    local = [chunk[r] for r in _local_rows(batch_size, process_index, process_count)]
    batches.append({"tokens": np.stack([r[0] for r in local]),
                    "weights": np.stack([r[1] for r in local])})
  return batches


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class Dataset:
  """What the loop needs: a train sampler, fixed validation batches, and the vocabulary size."""

  description: str
  vocab_size: int
  train: WindowSampler | DocumentStream
  val_batches: list[dict]
  train_tokens: int | None  # None for streams of unknown length
  tokenizer: str
  kind: str  # "windows" or "documents"
  fingerprint: dict  # identifies the data for checkpoint compatibility


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


def load_token_file(path: Path, cfg: Config) -> np.ndarray:
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


def _largest_id(tokens: np.ndarray) -> int:
  chunk = 1 << 24
  return max(int(np.max(tokens[i:i + chunk])) for i in range(0, len(tokens), chunk))


def _check_windows(name: str, tokens: np.ndarray, seq_len: int, where: str) -> None:
  if len(tokens) < seq_len + 1:
    raise ConfigError(
        f"--seq-len {seq_len} is longer than the {name} data ({len(tokens)} tokens, {where}); "
        f"a sequence needs seq_len + 1 = {seq_len + 1} tokens. Lower --seq-len"
        + (" or raise --val-fraction" if name == "validation" else "") + ".")


def _text_tokenizer(cfg: Config, train_texts: Callable[[], Iterable[str]], workdir: Path):
  kind = "byte" if cfg.tokenizer == "auto" else cfg.tokenizer
  if kind == "byte":
    return ByteTokenizer()
  if kind == "bpe":
    # Trained once per workdir and vocabulary size; a resumed run loads it, never retrains it.
    # (The trainer may stop below the requested size when no merges are left.)
    saved = workdir / f"tokenizer-bpe{cfg.bpe_vocab}.json"
    if saved.exists():
      return BPETokenizer.load(saved)
    tok = BPETokenizer.train(train_texts(), cfg.bpe_vocab)
    if jax.process_index() == 0:
      tok.save(saved)
    return tok
  raise ConfigError(f"--tokenizer {kind} does not apply to --data {cfg.data}")


def _jsonl_docs(path: Path, val: bool, val_every: int) -> Callable[[int, int, int], Iterator[str]]:
  """Documents of a .jsonl file: every `val_every`-th line is validation, the rest training."""

  def open_docs(skip: int, process_index: int, process_count: int) -> Iterator[str]:
    def gen():
      with path.open(encoding="utf-8") as f:
        mine = 0
        for line_no, line in enumerate(f):
          if not line.strip() or ((line_no % val_every == val_every - 1) != val):
            continue
          mine += 1
          if (mine - 1) % process_count != process_index:
            continue
          yield json.loads(line)["text"]
    return itertools.islice(gen(), skip, None)

  return open_docs


def _hf_c4_docs(split: str, seed: int) -> Callable[[int, int, int], Iterator[str]]:
  """C4 (en) streamed from the hub, shuffled as the authors did, split by process."""

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


def load_dataset(cfg: Config, workdir: Path | None = None) -> Dataset:
  """Reads, tokenizes and splits ``cfg.data``; every problem is a ConfigError naming the source."""
  workdir = Path(workdir or cfg.workdir)
  pi, pc = jax.process_index(), jax.process_count()

  if cfg.data in ("c4",) or Path(cfg.data).suffix in DOC_SUFFIXES:
    return _load_documents(cfg, workdir, pi, pc)

  if cfg.data == "shakespeare":
    where, text = "embedded Shakespeare corpus", read_embedded_corpus()
    tokens = None
  else:
    path = Path(cfg.data)
    where = str(path)
    if not path.exists():
      raise ConfigError(f"data path {path} does not exist (use --data shakespeare for the embedded "
                        "corpus, or a text file, a directory of *.txt, or a .bin/.npy token file)")
    if path.is_file() and path.suffix in TOKEN_SUFFIXES:
      if cfg.tokenizer not in ("auto",):
        raise ConfigError(f"--tokenizer {cfg.tokenizer} does not apply to a token file ({path})")
      tokens, text = load_token_file(path, cfg), None
    else:
      text, tokens = read_text_source(path), None

  if text is not None:
    if not text.strip():
      raise ConfigError(f"the corpus at {where} is empty")
    train_text, val_text = split_text(text, cfg.val_fraction)
    tok = _text_tokenizer(cfg, lambda: train_text.splitlines(keepends=True), workdir)
    train_tokens, val_tokens = tok.encode(train_text), tok.encode(val_text)
    vocab, tokenizer = tok.vocab_size, tok.name
  else:
    if len(tokens) == 0:
      raise ConfigError(f"the corpus at {where} is empty")
    cut = int(len(tokens) * (1 - cfg.val_fraction))
    train_tokens, val_tokens = tokens[:cut], tokens[cut:]
    vocab = cfg.vocab_size or _largest_id(tokens) + 1
    tokenizer = f"ids({tokens.dtype.name})"
    if cfg.vocab_size and _largest_id(tokens) >= cfg.vocab_size:
      raise ConfigError(f"token file {where} holds ids >= --vocab-size {cfg.vocab_size}")

  _check_windows("training", train_tokens, cfg.seq_len, where)
  _check_windows("validation", val_tokens, cfg.seq_len, where)
  return Dataset(
      description=f"{where}: {len(train_tokens):,} train / {len(val_tokens):,} val tokens "
                  f"({tokenizer} tokenizer, vocab {vocab})",
      vocab_size=int(vocab),
      train=WindowSampler(train_tokens, cfg.seq_len, cfg.seed),
      val_batches=eval_batches_from_windows(val_tokens, cfg.seq_len, cfg.batch_size,
                                            cfg.eval_batches, pi, pc),
      train_tokens=len(train_tokens), tokenizer=tokenizer, kind="windows",
      fingerprint={"data": cfg.data, "tokenizer": tokenizer, "vocab": int(vocab),
                   "train_tokens": int(len(train_tokens)), "val_fraction": cfg.val_fraction})


def _load_documents(cfg: Config, workdir: Path, pi: int, pc: int) -> Dataset:
  if cfg.data == "c4":
    where = "C4 (allenai/c4, en, streaming)"
    if cfg.tokenizer not in ("auto", "t5"):
      raise ConfigError("--data c4 uses the t5-base tokenizer (--tokenizer t5)")
    tok = T5Tokenizer()
    train_docs, val_docs = _hf_c4_docs("train", cfg.seed), _hf_c4_docs("validation", cfg.seed)
  else:
    path = Path(cfg.data)
    where = str(path)
    if not path.is_file():
      raise ConfigError(f"data path {path} does not exist")
    val_every = max(2, round(1 / cfg.val_fraction))
    train_docs, val_docs = _jsonl_docs(path, False, val_every), _jsonl_docs(path, True, val_every)
    first = next(train_docs(0, 0, 1), None)
    if first is None or next(val_docs(0, 0, 1), None) is None:
      raise ConfigError(f"the corpus at {path} is empty or has too few documents for a "
                        f"validation split (every {val_every}th line)")
    tok = _text_tokenizer(cfg, lambda: itertools.islice(train_docs(0, 0, 1), 100_000), workdir)

  def open_train(skip):
    return train_docs(skip, pi, pc)

  val_rows = []
  for text in itertools.islice(val_docs(0, 0, 1), cfg.batch_size * cfg.eval_batches):
    val_rows.append(encode_document(tok.encode(text), cfg.seq_len, tok.pad_id))
  return Dataset(
      description=f"{where}: one document per sequence ({tok.name} tokenizer, vocab "
                  f"{tok.vocab_size})",
      vocab_size=int(tok.vocab_size),
      train=DocumentStream(open_train, tok.encode, cfg.seq_len, tok.pad_id),
      val_batches=_pack_eval_rows(val_rows, cfg.seq_len, cfg.batch_size, pi, pc),
      train_tokens=None, tokenizer=tok.name, kind="documents",
      fingerprint={"data": cfg.data, "tokenizer": tok.name, "vocab": int(tok.vocab_size),
                   "val_fraction": cfg.val_fraction})


def global_batch(local: dict[str, np.ndarray], sharding, batch_size: int) -> dict[str, jax.Array]:
  """This process's rows -> one global ``jax.Array`` per field, split over the batch axes."""
  out = {}
  for name, rows in local.items():
    shape = (batch_size,) + rows.shape[1:]
    out[name] = jax.make_array_from_process_local_data(sharding, rows, shape)
  return out
