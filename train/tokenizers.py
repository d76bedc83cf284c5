"""Tokenizers: text to ids and back, and the choice of tokenizer for a text source (``--tokenizer``).

Every tokenizer has ``name``, ``vocab_size``, ``pad_id``, ``encode(text) -> np.ndarray`` of ids and
``decode(ids) -> str``:

* :class:`ByteTokenizer` - UTF-8 bytes (vocabulary 256); the default for text.
* :class:`BPETokenizer` - byte-level BPE trained on the run's training text (``--tokenizer bpe``),
  saved in the workdir once and loaded on resume, never retrained.
* :class:`T5Tokenizer` - the t5-base SentencePiece model the paper used for C4 (``c4`` extra).
* :class:`IdTokenizer` - token files hold ids already: it reads and prints them as numbers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterable

import jax
import numpy as np

from train.config import Config, ConfigError


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


class IdTokenizer:
  """The ids of a token file, which has no text: ``encode("5 17 3")`` reads numbers, decode prints."""

  pad_id = 0

  def __init__(self, dtype: np.dtype, vocab_size: int):
    self.dtype, self.vocab_size = np.dtype(dtype), vocab_size
    self.name = f"ids({self.dtype.name})"

  def encode(self, text: str) -> np.ndarray:
    return np.asarray([int(x) for x in re.findall(r"\d+", text)], dtype=self.dtype)

  def decode(self, ids) -> str:
    return " ".join(str(int(i)) for i in ids)


def text_tokenizer(cfg: Config, train_texts: Callable[[], Iterable[str]], workdir: Path):
  """The tokenizer ``--tokenizer`` asks for a text source (``auto`` is bytes).

  ``train_texts`` yields the training texts; it is called only when a BPE tokenizer has to be
  trained, which happens once per workdir and vocabulary size: a resumed run loads the saved one.
  """
  kind = "byte" if cfg.tokenizer == "auto" else cfg.tokenizer
  if kind == "byte":
    return ByteTokenizer()
  if kind == "bpe":
    # (The trainer may stop below the requested size when no merges are left.)
    saved = workdir / f"tokenizer-bpe{cfg.bpe_vocab}.json"
    if saved.exists():
      return BPETokenizer.load(saved)
    tok = BPETokenizer.train(train_texts(), cfg.bpe_vocab)
    if jax.process_index() == 0:
      tok.save(saved)
    return tok
  raise ConfigError(f"--tokenizer {kind} does not apply to --data {cfg.data}")
