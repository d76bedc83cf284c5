"""--init-from (Hugging Face directory or own checkpoint), --export-hf, tokens/s and MFU."""

from pathlib import Path

import jax
import numpy as np
import pytest

import _jax_cache
import models
from models import hf
from train import main, throughput
from train.config import ConfigError
from train.metrics import read_metrics

_jax_cache.enable()
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAST = ["--seq-len", "16", "--batch-size", "8", "--eval-batches", "1", "--no-progress",
        "--no-plot", "--sample-tokens", "0", "--eval-every", "1000", "--log-every", "1"]


@pytest.fixture(scope="module")
def tokens_96(tmp_path_factory):
  """A token file whose ids fit the fixture models' vocabulary of 96."""
  path = tmp_path_factory.mktemp("data") / "tokens.npy"
  np.save(path, np.random.default_rng(0).integers(0, 96, 6000).astype(np.uint16))
  return str(path)


@pytest.mark.parametrize("layers", [[], ["--scan-layers"]], ids=["per_layer", "stacked"])
def test_init_from_hf_then_export_gives_back_the_same_weights(tmp_path, tokens_96, layers):
  # Step 1's learning rate is 0 (linear warmup from 0): the exported weights are the loaded ones.
  src = FIXTURES / "hf_llama_gqa"
  out = tmp_path / "export"
  result = main(FAST + layers + ["--data", tokens_96, "--init-from", str(src), "--steps", "1",
                        "--schedule-steps", "4", "--warmup-steps", "2",
                        "--workdir", str(tmp_path / "run"),
                        "--export-hf", str(out)])
  assert result.num_params == models.count_params(
      models.abstract_model(hf.read_config(src)))  # the shape came from config.json, not --model
  original, exported = hf.read_tensors(src), hf.read_tensors(out)
  assert exported.keys() == original.keys()
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  assert hf.read_config(out).replace(max_seq_len=64) == hf.read_config(src)


def test_init_from_hf_starts_at_step_0_and_trains_the_loaded_model(tmp_path, tokens_96):
  src = FIXTURES / "hf_llama_mha"
  args = FAST + ["--data", tokens_96, "--init-from", str(src), "--steps", "3", "--warmup-steps",
                 "1", "--lr", "1e-3", "--workdir", str(tmp_path / "run")]
  result = main(args)
  assert result.start_step == 0 and sorted(result.losses) == [1, 2, 3]
  # A random model of the same shape starts elsewhere: the loss is the loaded model's.
  model = hf.from_pretrained(src)
  from train import data as data_lib
  from train.config import parse_args
  cfg = parse_args(args)
  batch = next(data_lib.load_dataset(cfg, tmp_path / "run").train_iterator(0, 1))
  logits = np.asarray(model(jax.numpy.asarray(batch["tokens"][:, :-1])))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
  expected = float((nll * batch["weights"]).sum() / batch["weights"].sum())
  assert result.losses[1] == pytest.approx(expected, rel=1e-5)
  # Rerunning resumes the run's own checkpoint instead of loading the weights again.
  again = main([a if a != "3" else "4" for a in args])  # --steps 3 -> 4
  assert again.start_step == 3


def test_init_from_own_checkpoint_takes_weights_and_shape_not_optimizer_state(tmp_path):
  first = main(FAST + ["--model", "tiny", "--steps", "2", "--workdir", str(tmp_path / "a")])
  # --model 9m is ignored: the shape is the checkpoint's. lr 0 at step 0 keeps the weights.
  second = main(FAST + ["--model", "9m", "--init-from", str(tmp_path / "a"), "--steps", "1",
                        "--schedule-steps", "4", "--warmup-steps", "2", "--optimizer", "adamw",
                        "--workdir", str(tmp_path / "b")])
  assert second.num_params == first.num_params and second.start_step == 0
  assert second.val_loss == pytest.approx(first.val_loss, rel=1e-6)
  # Rerunning the finished run with --export-hf trains nothing and exports; starting from the export
  # (lr 0 at step 0 again) gives the same validation loss.
  exported = main(FAST + ["--model", "tiny", "--steps", "2", "--workdir", str(tmp_path / "a"),
                          "--export-hf", str(tmp_path / "a_hf")])
  assert (exported.start_step, exported.final_step, exported.losses) == (2, 2, {})
  from_hf = main(FAST + ["--init-from", str(tmp_path / "a_hf"), "--steps", "1", "--schedule-steps",
                         "4", "--warmup-steps", "2", "--workdir", str(tmp_path / "d")])
  assert from_hf.val_loss == pytest.approx(first.val_loss, rel=1e-6)
  # The layer layout of a checkpoint is the run's; through the export it can change.
  with pytest.raises(ConfigError, match="its layers are stored per layer .* without --scan-layers"):
    main(FAST + ["--init-from", str(tmp_path / "a"), "--scan-layers", "--workdir",
                 str(tmp_path / "e")])
  stacked = main(FAST + ["--init-from", str(tmp_path / "a_hf"), "--steps", "1", "--schedule-steps",
                         "4", "--warmup-steps", "2", "--scan-layers", "--workdir", str(tmp_path / "f")])
  assert stacked.val_loss == pytest.approx(first.val_loss, rel=1e-5)
  third = main(FAST + ["--init-from", str(tmp_path / "a" / "checkpoints" / "2"), "--steps", "1",
                       "--schedule-steps", "4", "--warmup-steps", "2",
                       "--workdir", str(tmp_path / "c")])
  assert third.val_loss == pytest.approx(first.val_loss, rel=1e-6)


def test_init_from_errors_are_clear(tmp_path, tokens_96):
  with pytest.raises(ConfigError, match="no such file or directory"):
    main(FAST + ["--init-from", str(tmp_path / "missing"), "--workdir", str(tmp_path / "w")])
  with pytest.raises(ConfigError, match="neither a Hugging Face model directory"):
    main(FAST + ["--init-from", str(tmp_path), "--workdir", str(tmp_path / "w")])
  with pytest.raises(ConfigError, match="token ids up to 255 but .* vocabulary of 96"):
    main(FAST + ["--init-from", str(FIXTURES / "hf_llama_mha"), "--workdir", str(tmp_path / "w")])


def test_tokens_per_s_in_metrics_and_mfu_only_with_a_peak(tmp_path, capsys):
  plain = main(FAST + ["--steps", "2", "--workdir", str(tmp_path / "a")])
  records = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
  assert all(r["tokens_per_s"] > 0 for r in records)
  assert plain.mfu is None and not any("mfu" in r for r in records)  # CPU: no built-in peak
  capsys.readouterr()
  peaked = main(FAST + ["--steps", "2", "--peak-flops", "1e9", "--progress",
                        "--workdir", str(tmp_path / "b")])
  assert "mfu=" in capsys.readouterr().err  # the progress bar
  records = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
  cfg = models.get_config("tiny").replace(vocab_size=256)
  per_token = throughput.train_flops_per_token(cfg, 16)
  for r in records:
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / 1e9)
  assert peaked.mfu == pytest.approx(peaked.tokens_per_second * per_token / 1e9)


def test_flops_per_token_counts_matmul_params_and_attention():
  cfg = models.get_config("60m")  # 58.07M parameters, 16.38M of them the embedding table
  assert throughput.matmul_params(cfg) == cfg.num_params() - 32000 * 512 - (2 * 8 + 1) * 512
  assert throughput.train_flops_per_token(cfg, 256) == (
      6 * throughput.matmul_params(cfg) + 12 * 8 * 256 * 512)
  gqa = cfg.replace(num_kv_heads=2)  # k and v shrink 4x
  assert throughput.matmul_params(cfg) - throughput.matmul_params(gqa) == 8 * 2 * 512 * 384


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A10G", 70e12), ("NVIDIA L4", 121e12),
    ("Tesla V100-SXM2-16GB", 125e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("Some New Accelerator", None),
])
def test_peak_table(kind, peak):
  assert throughput.peak_flops(kind) == peak


def test_device_peak_is_none_on_cpu_unless_given():
  assert jax.devices()[0].platform == "cpu"
  assert throughput.device_peak_flops() is None
  assert throughput.device_peak_flops(2e12) == 2e12
  assert throughput.mfu(1000.0, 1e6, None, 1) is None
  assert throughput.mfu(1000.0, 1e6, 1e10, 4) == pytest.approx(0.025)
