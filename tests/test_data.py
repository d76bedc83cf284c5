"""Data: corpora, tokenizers, splits, deterministic batches, shards, resume and input errors."""

import json

import jax
import numpy as np
import pytest

from train import data as data_lib
from train import sources, tokenizers
from train.config import Config, ConfigError


def cfg_for(path, tmp_path, **kw):
  return Config(data=str(path), workdir=str(tmp_path / "run"), **kw)


def test_embedded_corpus_is_the_complete_works():
  text = sources.read_embedded_corpus()
  assert len(text) > 5_000_000
  assert "To be, or not to be" in text and "THE SONNETS" in text.upper()


def test_byte_tokenizer_round_trips_utf8():
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode("Ay, marry — 'tis so")
  assert ids.max() < 256 and tok.vocab_size == 256
  assert tok.decode(ids) == "Ay, marry — 'tis so"


def test_split_is_deterministic_and_cut_at_a_line_break():
  text = "".join(f"line {i}\n" for i in range(1000))
  train, val = sources.split_text(text, 0.05)
  assert train + val == text and train.endswith("\n")
  assert 0.04 < len(val) / len(text) < 0.06
  assert sources.split_text(text, 0.05) == (train, val)


def test_windows_are_a_pure_function_of_seed_and_step():
  tokens = np.arange(1000, dtype=np.uint16)
  a = data_lib.window_batches(tokens, 16, seed=3, batch_size=4)
  b = data_lib.window_batches(tokens, 16, seed=3, batch_size=4)
  for step in (0, 7, 100):  # 100 is past the first epoch
    np.testing.assert_array_equal(a[step]["tokens"], b[step]["tokens"])
  other = data_lib.window_batches(tokens, 16, seed=4, batch_size=4)
  assert not np.array_equal(a[0]["tokens"], other[0]["tokens"])
  batch = a[5]
  assert batch["tokens"].shape == (4, 17) and batch["tokens"].dtype == np.int32
  assert batch["weights"].shape == (4, 16) and batch["weights"].dtype == np.float32
  # Windows are contiguous runs of the stream.
  assert (np.diff(batch["tokens"], axis=1) == 1).all()
  # Iterating from step 0 gives the random-access batches.
  it = iter(a.to_iter_dataset(data_lib.READ_OPTIONS))
  for step in range(12):
    np.testing.assert_array_equal(next(it)["tokens"], a[step]["tokens"])


def test_every_epoch_visits_every_window_once_in_a_new_order():
  tokens = np.arange(40 * 8 + 1, dtype=np.uint16)
  batches = data_lib.window_batches(tokens, 8, seed=0, batch_size=3)
  n = 39  # 40 windows, less one for the phase
  starts = np.concatenate([batches[s]["tokens"][:, 0] for s in range(2 * n // 3)])
  epochs = starts[:n], starts[n:]
  for epoch in epochs:
    assert len(set(epoch.tolist())) == n
    assert len(set(int(x) % 8 for x in epoch)) == 1  # one phase per epoch
  assert not np.array_equal(epochs[0] // 8, epochs[1] // 8)  # another permutation


def _token_file(tmp_path, n=5000):
  path = tmp_path / "ids.npy"
  np.save(path, np.arange(n, dtype=np.uint16))
  return path


def _jsonl(tmp_path, n=60):
  docs = [{"text": f"document number {i} " + "z" * (i % 7)} for i in range(n)]
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps(d) + "\n" for d in docs))
  return path, docs


@pytest.mark.parametrize("kind", ["windows", "documents"])
def test_the_process_shards_of_a_step_make_its_global_batch(tmp_path, kind):
  path = _token_file(tmp_path, 1000) if kind == "windows" else _jsonl(tmp_path)[0]
  ds = data_lib.load_dataset(cfg_for(path, tmp_path, seq_len=10, batch_size=8, val_fraction=0.1))
  assert ds.kind == kind
  steps = 20  # past the first epoch: 89 windows, or 54 training documents
  whole = ds.train_iterator(0, 1)
  expected = [next(whole) for _ in range(steps)]
  for count in (2, 4):
    iters = [ds.train_iterator(p, count) for p in range(count)]
    for step in range(steps):
      parts = [next(it) for it in iters]
      for name in ("tokens", "weights"):
        assert parts[0][name].shape[0] == 8 // count
        np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]),
                                      expected[step][name], err_msg=f"{count} {step} {name}")
  with pytest.raises(ConfigError, match="does not split over 3 processes"):
    ds.train_iterator(0, 3)


@pytest.mark.parametrize("kind", ["windows", "documents"])
def test_a_saved_iterator_state_resumes_the_same_batches(tmp_path, kind):
  path = _token_file(tmp_path, 1000) if kind == "windows" else _jsonl(tmp_path)[0]
  cfg = cfg_for(path, tmp_path, seq_len=10, batch_size=4, val_fraction=0.1)
  ds = data_lib.load_dataset(cfg)
  it = ds.train_iterator(1, 2)
  assert it.get_state() == {"next_index": 0}
  uninterrupted = [next(it)["tokens"] for _ in range(40)]
  it = ds.train_iterator(1, 2)
  for _ in range(17):
    next(it)
  saved = json.loads(json.dumps(it.get_state()))  # JSON, as in a checkpoint
  assert saved == {"next_index": 17}
  resumed = data_lib.load_dataset(cfg).train_iterator(1, 2)
  resumed.set_state(saved)
  for step in range(17, 40):
    np.testing.assert_array_equal(next(resumed)["tokens"], uninterrupted[step])
  sought = ds.train_iterator(1, 2)
  ds.seek(sought, 33)  # a checkpoint with a step and no data state
  np.testing.assert_array_equal(next(sought)["tokens"], uninterrupted[33])
  assert sought.get_state() == {"next_index": 34}


def test_embedded_dataset_loads_with_the_byte_tokenizer(tmp_path):
  ds = data_lib.load_dataset(Config(seq_len=64, batch_size=4, eval_batches=2,
                                    workdir=str(tmp_path)))
  assert ds.vocab_size == 256 and ds.kind == "windows"
  assert 4_500_000 < ds.train_tokens < 5_000_000
  assert len(ds.val_batches) == 2 and ds.val_batches[0]["tokens"].shape == (4, 65)


def test_text_file_and_directory_sources(tmp_path):
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "b.txt").write_text("second file " * 200)
  (tmp_path / "corpus" / "a.txt").write_text("first file " * 200)
  (tmp_path / "corpus" / "skip.md").write_text("not read")
  ds = data_lib.load_dataset(cfg_for(tmp_path / "corpus", tmp_path, seq_len=16, batch_size=2))
  text = sources.read_text_source(tmp_path / "corpus")
  assert text.startswith("first file") and "second file" in text and "not read" not in text
  train_text, _ = sources.split_text(text, 0.05)
  assert ds.train_tokens == len(train_text.encode("utf-8"))
  single = tmp_path / "one.txt"
  single.write_text("hello world\n" * 100)
  assert data_lib.load_dataset(cfg_for(single, tmp_path, seq_len=8, batch_size=2)).vocab_size == 256


def test_token_files_are_memory_mapped(tmp_path):
  ids = (np.arange(20_000) * 7 % 3000).astype(np.uint16)
  ids.tofile(tmp_path / "tokens.bin")
  cfg = cfg_for(tmp_path / "tokens.bin", tmp_path, seq_len=32, batch_size=4)
  assert isinstance(sources.load_token_file(tmp_path / "tokens.bin", cfg), np.memmap)
  ds = data_lib.load_dataset(cfg)
  assert ds.vocab_size == 3000 and ds.train_tokens == 19_000
  assert ds.tokenizer.name == "ids(uint16)" and ds.fingerprint["tokenizer"] == "ids(uint16)"
  assert ds.tokenizer.decode([5, 17]) == "5 17"
  np.testing.assert_array_equal(ds.tokenizer.encode("5 17"), [5, 17])
  np.save(tmp_path / "tokens.npy", ids.astype(np.uint32))
  cfg = cfg_for(tmp_path / "tokens.npy", tmp_path, seq_len=32, batch_size=4, vocab_size=4096)
  assert isinstance(sources.load_token_file(tmp_path / "tokens.npy", cfg), np.memmap)
  ds = data_lib.load_dataset(cfg)
  assert ds.vocab_size == 4096 and ds.tokenizer.name == "ids(uint32)"
  row = next(ds.train_iterator(0, 1))["tokens"][0]
  assert any(np.array_equal(row, ids[i:i + 33]) for i in np.flatnonzero(ids == row[0]))
  with pytest.raises(ConfigError, match="ids >= --vocab-size 100"):
    data_lib.load_dataset(cfg_for(tmp_path / "tokens.npy", tmp_path, seq_len=32, vocab_size=100))
  np.save(tmp_path / "floats.npy", np.zeros(100, np.float32))
  with pytest.raises(ConfigError, match="uint16 or uint32"):
    data_lib.load_dataset(cfg_for(tmp_path / "floats.npy", tmp_path))
  (tmp_path / "odd.bin").write_bytes(b"\x00" * 7)
  with pytest.raises(ConfigError, match="not a multiple of 2"):
    data_lib.load_dataset(cfg_for(tmp_path / "odd.bin", tmp_path))


@pytest.mark.parametrize("case", ["missing", "empty", "blank", "nodir", "short", "shortval"])
def test_bad_data_gives_clear_errors(tmp_path, case):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  blank = tmp_path / "blank.txt"
  blank.write_text("  \n\n  ")
  (tmp_path / "nothing").mkdir()
  small = tmp_path / "small.txt"
  small.write_text("x" * 300 + "\n" + "y" * 20 + "\n")
  cfgs = {
      "missing": (cfg_for(tmp_path / "nope.txt", tmp_path), "does not exist"),
      "empty": (cfg_for(empty, tmp_path), "is empty"),
      "blank": (cfg_for(blank, tmp_path), "is empty"),
      "nodir": (cfg_for(tmp_path / "nothing", tmp_path), r"no \*.txt files"),
      "short": (cfg_for(small, tmp_path, seq_len=1000), "--seq-len 1000 is longer than the training"),
      "shortval": (cfg_for(small, tmp_path, seq_len=64, val_fraction=0.01),
                   "longer than the validation data"),
  }
  cfg, message = cfgs[case]
  with pytest.raises(ConfigError, match=message) as info:
    data_lib.load_dataset(cfg)
  assert str(cfg.data) in str(info.value)  # the message names the source


def test_eval_batches_pad_with_zero_weight_rows():
  tokens = np.arange(100, dtype=np.uint16)
  batches = data_lib.eval_batches_from_windows(tokens, 10, batch_size=4, num_batches=5)
  assert len(batches) == 3  # 9 windows of 11 tokens: 4 + 4 + 1 (padded)
  assert batches[-1]["weights"].sum() == 10 and batches[0]["weights"].sum() == 40
  np.testing.assert_array_equal(batches[0]["tokens"][1], np.arange(10, 21))


def test_documents_one_per_sequence_in_order_padded_with_weight_0(tmp_path):
  path, docs = _jsonl(tmp_path)
  (tmp_path / "blank.jsonl").write_text(path.read_text().replace("\n", "\n\n", 3))
  ds = data_lib.load_dataset(cfg_for(path, tmp_path, seq_len=20, batch_size=4, val_fraction=0.1,
                                     eval_batches=1))
  assert ds.kind == "documents" and ds.vocab_size == 256 and ds.train_tokens is None
  tok = ds.tokenizer
  train = [d["text"] for i, d in enumerate(docs) if i % 10 != 9]
  it = ds.train_iterator(0, 1)
  rows = [r for _ in range(20) for r in zip(*next(it).values())]  # past the end: starts over
  assert len(rows) == 80
  for i, (tokens, weights) in enumerate(rows):
    text = train[i % len(train)]
    n = min(len(text), 21)  # ids of the sequence: the document, cut at seq_len + 1
    assert tok.decode(tokens[:n]) == text[:21]
    # Weights mark real next tokens only; padding beyond a short document has weight 0.
    np.testing.assert_array_equal(weights, np.arange(20) < n - 1)
    assert (tokens[n:] == tok.pad_id).all()
  assert any(len(t) < 21 for t in train) and any(len(t) > 21 for t in train)
  # Blank lines count as lines (for the every-10th-line validation split) and hold no document.
  blank = data_lib.load_dataset(cfg_for(tmp_path / "blank.jsonl", tmp_path, seq_len=20,
                                        batch_size=16, val_fraction=0.1, eval_batches=1))
  lines = (tmp_path / "blank.jsonl").read_text().split("\n")
  want = [json.loads(line)["text"][:21] for i, line in enumerate(lines) if line and i % 10 != 9]
  got = next(blank.train_iterator(0, 1))
  assert [tok.decode(t[:int(w.sum()) + 1]) for t, w in zip(got["tokens"], got["weights"])] == (
      want[:16])
  # Every 10th line is validation and never a training document.
  val_text = {tok.decode(r[:int(w.sum()) + 1]) for b in ds.val_batches
              for r, w in zip(b["tokens"], b["weights"]) if w.sum()}
  want = {docs[i]["text"][:21] for i in (9, 19, 29, 39)}  # eval: batch 4 x 1 batch
  assert val_text == want


def test_encode_document_truncates_and_pads():
  tokens, weights = data_lib.encode_document(np.arange(1, 4), seq_len=5, pad_id=0)
  np.testing.assert_array_equal(tokens, [1, 2, 3, 0, 0, 0])
  np.testing.assert_array_equal(weights, [1, 1, 0, 0, 0])
  tokens, weights = data_lib.encode_document(np.arange(1, 20), seq_len=5, pad_id=0)
  np.testing.assert_array_equal(tokens, [1, 2, 3, 4, 5, 6])
  assert weights.sum() == 5


def test_bpe_tokenizer_is_trained_on_train_text_and_reused(tmp_path):
  pytest.importorskip("tokenizers")
  corpus = tmp_path / "c.txt"
  corpus.write_text("".join(f"the king and the queen spoke of {w}\n"
                            for w in ["war", "peace", "love", "death"] * 200))
  cfg = cfg_for(corpus, tmp_path, tokenizer="bpe", bpe_vocab=280, seq_len=8, batch_size=2)
  ds = data_lib.load_dataset(cfg)
  saved = tmp_path / "run" / "tokenizer-bpe280.json"
  assert saved.exists() and ds.vocab_size == 280 and ds.tokenizer.name == "bpe"
  assert ds.train_tokens < 0.5 * len(corpus.read_text())  # merges shorten the stream
  tok = tokenizers.BPETokenizer.load(saved)
  assert tok.decode(tok.encode("the king spoke of love\n")) == "the king spoke of love\n"
  saved.write_bytes(saved.read_bytes())
  stamp = saved.stat().st_mtime_ns
  again = data_lib.load_dataset(cfg)  # a resume loads the saved tokenizer, never retrains it
  assert saved.stat().st_mtime_ns == stamp and again.fingerprint == ds.fingerprint
  for a, b in zip(again.val_batches, ds.val_batches):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  np.testing.assert_array_equal(next(again.train_iterator(0, 1))["tokens"],
                                next(ds.train_iterator(0, 1))["tokens"])


def test_global_batch_assembles_a_sharded_array():
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  local = {"tokens": np.ones((4, 9), np.int32), "weights": np.ones((4, 8), np.float32)}
  out = data_lib.global_batch(local, sharding, 4)
  assert out["tokens"].shape == (4, 9) and out["tokens"].sharding == sharding


def test_c4_streaming_code_path_on_local_data(tmp_path, monkeypatch):
  """--data c4 with stand-ins for `datasets` and the t5 tokenizer (the real ones need the network)."""
  import sys
  import types

  docs = [{"text": f"c4 document {i} " * (i % 5 + 1)} for i in range(50)]
  calls = []

  class Stream:
    def __init__(self, rows):
      self.rows = rows

    def shuffle(self, seed):
      calls.append(("shuffle", seed))
      return Stream(self.rows[::-1])

    def skip(self, n):
      return Stream(self.rows[n:])

    def __iter__(self):
      return iter(self.rows)

  def load_dataset(path, name, split, streaming):
    calls.append((path, name, split, streaming))
    return Stream(docs if split == "train" else docs[:6])

  datasets = types.ModuleType("datasets")
  datasets.load_dataset = load_dataset
  distributed = types.ModuleType("datasets.distributed")
  distributed.split_dataset_by_node = lambda ds, rank, world_size: Stream(ds.rows[rank::world_size])
  datasets.distributed = distributed
  transformers = types.ModuleType("transformers")

  class AutoTokenizer:
    @staticmethod
    def from_pretrained(name, **kwargs):
      calls.append(("tokenizer", name))
      return lambda text: {"input_ids": [32050] + list(text.encode()) + [1]}  # a sentinel id

  transformers.AutoTokenizer = AutoTokenizer
  monkeypatch.setitem(sys.modules, "datasets", datasets)
  monkeypatch.setitem(sys.modules, "datasets.distributed", distributed)
  monkeypatch.setitem(sys.modules, "transformers", transformers)

  cfg = Config(data="c4", seq_len=16, batch_size=4, eval_batches=1, workdir=str(tmp_path))
  ds = data_lib.load_dataset(cfg)
  assert (ds.kind, ds.tokenizer.name, ds.vocab_size) == ("documents", "t5", 32000)
  it = ds.train_iterator(0, 1)
  batches = [next(it)["tokens"] for _ in range(3)]
  assert json.loads(json.dumps(it.get_state())) == {"next_index": 3}
  assert {("allenai/c4", "en", "train", True), ("allenai/c4", "en", "validation", True),
          ("tokenizer", "t5-base"), ("shuffle", 0)} <= set(calls)
  assert batches[0][0, 0] == tokenizers.T5Tokenizer.unk_id  # ids >= 32000 map to <unk>
  assert bytes(batches[2][0, 1:13].tolist()) == b"c4 document "  # shuffled (reversed) order
  assert bytes(batches[0][0, 1:16].tolist()) == docs[49]["text"].encode()[:15]
  fresh = data_lib.load_dataset(cfg)
  resumed = fresh.train_iterator(0, 1)
  fresh.seek(resumed, 2)  # resume: skip
  np.testing.assert_array_equal(next(resumed)["tokens"], batches[2])
  assert resumed.get_state() == {"next_index": 3}
  # Two processes read their own parts of the stream (split_dataset_by_node): rows 0, 2, 4, ...
  halves = [next(fresh.train_iterator(p, 2))["tokens"] for p in range(2)]
  np.testing.assert_array_equal(halves[0], batches[0][[0, 2]])
  np.testing.assert_array_equal(halves[1], batches[0][[1, 3]])
  # Validation: the first 4 documents; the first has 16 ids (15 targets), the others are cut.
  assert len(ds.val_batches) == 1 and ds.val_batches[0]["weights"].sum() == 15 + 3 * 16
