"""Data: corpora, tokenizers, splits, deterministic batches, shards and input errors."""

import json

import jax
import numpy as np
import pytest

from train import data as data_lib
from train.config import Config, ConfigError


def cfg_for(path, tmp_path, **kw):
  return Config(data=str(path), workdir=str(tmp_path / "run"), **kw)


def test_embedded_corpus_is_the_complete_works():
  text = data_lib.read_embedded_corpus()
  assert len(text) > 5_000_000
  assert "To be, or not to be" in text and "THE SONNETS" in text.upper()


def test_byte_tokenizer_round_trips_utf8():
  tok = data_lib.ByteTokenizer()
  ids = tok.encode("Ay, marry — 'tis so")
  assert ids.max() < 256 and tok.vocab_size == 256
  assert tok.decode(ids) == "Ay, marry — 'tis so"


def test_split_is_deterministic_and_cut_at_a_line_break():
  text = "".join(f"line {i}\n" for i in range(1000))
  train, val = data_lib.split_text(text, 0.05)
  assert train + val == text and train.endswith("\n")
  assert 0.04 < len(val) / len(text) < 0.06
  assert data_lib.split_text(text, 0.05) == (train, val)


def test_windows_are_a_pure_function_of_seed_and_step():
  tokens = np.arange(1000, dtype=np.uint16)
  a = data_lib.WindowSampler(tokens, 16, seed=3)
  b = data_lib.WindowSampler(tokens, 16, seed=3)
  for step in (0, 7, 100):  # 100 is past the first epoch
    np.testing.assert_array_equal(a.batch(step, 4)["tokens"], b.batch(step, 4)["tokens"])
  assert not np.array_equal(a.batch(0, 4)["tokens"],
                            data_lib.WindowSampler(tokens, 16, seed=4).batch(0, 4)["tokens"])
  batch = a.batch(5, 4)
  assert batch["tokens"].shape == (4, 17) and batch["tokens"].dtype == np.int32
  assert batch["weights"].shape == (4, 16)
  # Windows are contiguous runs of the stream.
  assert (np.diff(batch["tokens"], axis=1) == 1).all()


def test_an_epoch_visits_every_window_once():
  tokens = np.arange(10 * 8 + 1, dtype=np.uint16)
  sampler = data_lib.WindowSampler(tokens, 8, seed=0)
  n = sampler.num_windows
  starts = [sampler.batch(s, 1)["tokens"][0, 0] for s in range(n)]
  assert len(set(starts)) == n
  assert len(set(int(x) % 8 for x in starts)) == 1  # one phase per epoch


def test_each_process_reads_its_own_rows_of_the_global_batch():
  tokens = np.arange(5000, dtype=np.uint16)
  sampler = data_lib.WindowSampler(tokens, 10, seed=1)
  whole = sampler.batch(3, 8)["tokens"]
  parts = [sampler.batch(3, 8, process_index=p, process_count=4)["tokens"] for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)


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
  text = data_lib.read_text_source(tmp_path / "corpus")
  assert text.startswith("first file") and "second file" in text and "not read" not in text
  train_text, _ = data_lib.split_text(text, 0.05)
  assert ds.train_tokens == len(train_text.encode("utf-8"))
  single = tmp_path / "one.txt"
  single.write_text("hello world\n" * 100)
  assert data_lib.load_dataset(cfg_for(single, tmp_path, seq_len=8, batch_size=2)).vocab_size == 256


def test_token_files_are_memory_mapped(tmp_path):
  ids = (np.arange(20_000) * 7 % 3000).astype(np.uint16)
  ids.tofile(tmp_path / "tokens.bin")
  ds = data_lib.load_dataset(cfg_for(tmp_path / "tokens.bin", tmp_path, seq_len=32, batch_size=4))
  assert isinstance(ds.train.tokens, np.memmap)
  assert ds.vocab_size == 3000 and ds.train_tokens == 19_000
  np.save(tmp_path / "tokens.npy", ids.astype(np.uint32))
  ds = data_lib.load_dataset(cfg_for(tmp_path / "tokens.npy", tmp_path, seq_len=32, batch_size=4,
                                     vocab_size=4096))
  assert ds.vocab_size == 4096 and isinstance(ds.train.tokens, np.memmap)
  row = ds.train.batch(0, 4)["tokens"][0]
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


def test_documents_one_per_sequence_padded_and_resumable(tmp_path):
  docs = [{"text": f"document number {i} " + "z" * (i % 7)} for i in range(60)]
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps(d) + "\n" for d in docs))
  ds = data_lib.load_dataset(cfg_for(path, tmp_path, seq_len=24, batch_size=4, val_fraction=0.1,
                                     eval_batches=1))
  assert ds.kind == "documents" and ds.vocab_size == 256
  first = ds.train.batch(0, 4)
  tok = data_lib.ByteTokenizer()
  assert tok.decode(first["tokens"][0][:first["weights"][0].sum().astype(int) + 1]).startswith(
      "document number 0")
  # Weights mark real next tokens only; padding beyond a short document has weight 0.
  assert first["weights"][0].sum() == min(len(docs[0]["text"]), 25) - 1
  sequential = [ds.train.batch(s, 4)["tokens"] for s in range(1, 20)]  # wraps past the end
  fresh = data_lib.load_dataset(cfg_for(path, tmp_path, seq_len=24, batch_size=4,
                                        val_fraction=0.1, eval_batches=1))
  np.testing.assert_array_equal(fresh.train.batch(17, 4)["tokens"], sequential[16])
  # Every 10th line is validation and never a training document.
  val_text = {tok.decode(r[:int(w.sum()) + 1]) for b in ds.val_batches
              for r, w in zip(b["tokens"], b["weights"]) if w.sum()}
  want = {docs[i]["text"][:25] for i in (9, 19, 29, 39)}  # eval: batch 4 x 1 batch
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
  assert saved.exists() and ds.vocab_size == 280 and ds.tokenizer == "bpe"
  assert ds.train_tokens < 0.5 * len(corpus.read_text())  # merges shorten the stream
  tok = data_lib.BPETokenizer.load(saved)
  assert tok.decode(tok.encode("the king spoke of love\n")) == "the king spoke of love\n"
  saved.write_bytes(saved.read_bytes())
  stamp = saved.stat().st_mtime_ns
  again = data_lib.load_dataset(cfg)  # a resume loads the saved tokenizer, never retrains it
  assert saved.stat().st_mtime_ns == stamp and again.fingerprint == ds.fingerprint
  np.testing.assert_array_equal(again.train.tokens, ds.train.tokens)


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
  assert (ds.kind, ds.tokenizer, ds.vocab_size) == ("documents", "t5", 32000)
  batches = [ds.train.batch(s, 4)["tokens"] for s in range(3)]
  assert {("allenai/c4", "en", "train", True), ("allenai/c4", "en", "validation", True),
          ("tokenizer", "t5-base"), ("shuffle", 0)} <= set(calls)
  assert batches[0][0, 0] == data_lib.T5Tokenizer.unk_id  # ids >= 32000 map to <unk>
  assert bytes(batches[2][0, 1:13].tolist()) == b"c4 document "  # shuffled (reversed) order
  assert bytes(batches[0][0, 1:16].tolist()) == docs[49]["text"].encode()[:15]
  fresh = data_lib.load_dataset(cfg)
  np.testing.assert_array_equal(fresh.train.batch(2, 4)["tokens"], batches[2])  # resume: skip
  # Validation: the first 4 documents; the first has 16 ids (15 targets), the others are cut.
  assert len(ds.val_batches) == 1 and ds.val_batches[0]["weights"].sum() == 15 + 3 * 16
