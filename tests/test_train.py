"""The training script: main job defaults, end to end, mesh, optimizers, spikes, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh

import _jax_cache
from train import evaluate, main, optimizers, spike_report
from train.config import OPTIMIZERS, Config, ConfigError, parse_args
from train.mesh import check_batch, multihost_environment, parse_mesh
from train.spike_injection import inject_spikes
from train.metrics import MetricsWriter, plot_loss_curves, read_metrics

_jax_cache.enable()
REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--seq-len", "16", "--batch-size", "8", "--eval-batches", "1",
        "--no-progress", "--no-plot", "--sample-tokens", "0", "--eval-every", "1000", "--log-every", "4"]


def run_cli(args, devices: int = 1, timeout: int = 300):
  extra = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"} if devices > 1 else {}
  return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=_jax_cache.subprocess_env(**extra))


def test_no_arguments_is_the_tiny_spam_main_job():
  cfg = parse_args([])
  assert (cfg.model, cfg.optimizer, cfg.data, cfg.tokenizer) == ("tiny", "spam", "shakespeare",
                                                                 "auto")
  assert cfg.density == 1.0 and cfg.threshold == 5000 and cfg.reset_interval == 500
  assert cfg.progress and cfg.plot and cfg.mesh is None
  cfg = parse_args(["--model", "60m", "--optimizer", "adamw", "--steps", "400", "--batch-size",
                    "8", "--seq-len", "64", "--workdir", "runs/x", "--checkpoint-every", "100",
                    "--eval-every", "100", "--seed", "0", "--lr", "1e-3", "--data", "x.txt",
                    "--mesh", "data=2,fsdp=4", "--density", "0.25", "--no-progress"])
  assert (cfg.model, cfg.steps, cfg.mesh, cfg.density, cfg.progress) == (
      "60m", 400, "data=2,fsdp=4", 0.25, False)


def test_end_to_end_cli_run_writes_metrics_plot_and_checkpoint(tmp_path):
  work = tmp_path / "run"
  args = [a for a in FAST if a not in ("--no-progress", "--no-plot", "--sample-tokens", "0")]
  proc = run_cli(args + ["--workdir", str(work), "--steps", "5", "--eval-every", "5",
                         "--sample-tokens", "40",
                         "--clip-delay", "1", "--spike-prob", "0.5", "--spike-scale", "10",
                         "--warmup-steps", "2"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "final validation (step 5" in proc.stdout and "perplexity" in proc.stdout
  for field in ("tok/s", "loss=", "lr=", "spikes="):  # the progress bar
    assert field in proc.stderr
  records = read_metrics(work / "metrics.jsonl")
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
  assert {"loss", "grad_norm", "lr", "spikes", "injected"} <= set(train[0])
  assert train[0]["lr"] == 0.0 and train[-1]["lr"] > 0  # linear warmup from 0
  (val,) = [r for r in records if "val_loss" in r]
  assert val["step"] == 5 and val["val_ppl"] == pytest.approx(np.exp(val["val_loss"]))
  assert (work / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
  assert (work / "checkpoints" / "5").is_dir()
  assert np.all(np.isfinite([r["loss"] for r in train]))
  # TensorBoard holds the same scalars as metrics.jsonl
  events = tensorboard_scalars(work / "tensorboard")
  assert [s for s, _ in events["loss"]] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([v for _, v in events["loss"]], [r["loss"] for r in train], rtol=1e-6)
  assert events["val_loss"] == [(5, pytest.approx(val["val_loss"]))]
  assert "sample (40 tokens after the prompt" in proc.stdout


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} from the TFRecord event files in `logdir` (no TensorBoard needed)."""
  import struct

  from tensorboardX.proto.event_pb2 import Event
  out: dict[str, list] = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_mesh_data2_fsdp4_on_8_cpu_devices_matches_one_device(tmp_path):
  args = FAST + ["--steps", "4", "--density", "0.5", "--reset-interval", "3",
                 "--reset-warmup", "1", "--clip-delay", "1"]
  proc = run_cli(args + ["--workdir", str(tmp_path / "mesh"), "--mesh", "data=2,fsdp=4"],
                 devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1} on 8 cpu device(s)" in proc.stdout
  one = main(args + ["--workdir", str(tmp_path / "one")])
  sharded = [r for r in read_metrics(tmp_path / "mesh" / "metrics.jsonl") if "loss" in r]
  np.testing.assert_allclose([r["loss"] for r in sharded], [one.losses[s] for s in range(1, 5)],
                             rtol=2e-5)
  val = [r for r in read_metrics(tmp_path / "mesh" / "metrics.jsonl") if "val_loss" in r]
  assert val[-1]["val_loss"] == pytest.approx(one.val_loss, rel=2e-5)


def test_sparse_run_on_a_tensor_parallel_mesh_resumes_on_one_device(tmp_path):
  """--density 0.25 on fsdp=4,tensor=2: its state follows the parameters' shardings through the
  general rule, and its checkpoint resumes on one device as if never interrupted."""
  args = FAST + ["--density", "0.25", "--reset-interval", "3", "--reset-warmup", "1",
                 "--clip-delay", "1", "--schedule-steps", "6", "--checkpoint-every", "3"]
  proc = run_cli(args + ["--workdir", str(tmp_path / "mesh"), "--mesh", "fsdp=4,tensor=2",
                         "--steps", "3"], devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed = main(args + ["--workdir", str(tmp_path / "mesh"), "--steps", "6"])
  whole = main(args + ["--workdir", str(tmp_path / "one"), "--steps", "6"])
  assert resumed.start_step == 3
  np.testing.assert_allclose([resumed.losses[s] for s in range(4, 7)],
                             [whole.losses[s] for s in range(4, 7)], rtol=2e-5)
  assert resumed.val_loss == pytest.approx(whole.val_loss, rel=2e-5)


def test_scanned_layers_on_a_mesh_train_like_the_per_layer_model(tmp_path):
  """--scan-layers stores the weights stacked: on fsdp=4,tensor=2 with Stable-SPAM (per-tensor
  statistics kept per layer) the losses equal the unrolled, per-layer model's on one device."""
  args = FAST + ["--steps", "4", "--optimizer", "stable_spam", "--stable-reset-interval", "3"]
  proc = run_cli(args + ["--workdir", str(tmp_path / "mesh"), "--mesh", "fsdp=4,tensor=2",
                         "--scan-layers"], devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  per_layer = main(args + ["--workdir", str(tmp_path / "one")])
  scanned = [r for r in read_metrics(tmp_path / "mesh" / "metrics.jsonl") if "loss" in r]
  np.testing.assert_allclose([r["loss"] for r in scanned],
                             [per_layer.losses[s] for s in range(1, 5)], rtol=2e-5)


def test_batch_that_does_not_divide_over_the_mesh_is_rejected_before_compiling(tmp_path):
  proc = run_cli(FAST + ["--workdir", str(tmp_path), "--steps", "2", "--mesh", "data=2,fsdp=4",
                         "--batch-size", "6"], devices=8)
  assert proc.returncode == 2
  assert "--batch-size 6 does not divide over the mesh" in proc.stderr
  assert "Traceback" not in proc.stderr
  check_batch(Config(batch_size=16), AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor")))
  with pytest.raises(ConfigError, match="data=2 x fsdp=4 = 8 devices"):
    check_batch(Config(batch_size=12), AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor")))


class CompileCounter:
  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self)

  def __call__(self, name, duration, **kwargs):
    if name == "/jax/core/compile/backend_compile_duration":
      self.count += 1


@pytest.fixture(scope="module")
def compiles():
  return CompileCounter()


@pytest.mark.parametrize("flags, message", [
    (["--model", "65m"], "unknown --model '65m'; valid: tiny, 9m, 20m, 35m, 60m, 130m"),
    (["--optimizer", "adam8bit"], "valid: spam, stable_spam, adam, adamw, "
                                  "adam_clip_norm, adam_clip_value, adafactor, galore"),
    (["--data", "/nonexistent/corpus.txt"], "data path /nonexistent/corpus.txt does not exist"),
    (["--data", "EMPTY"], "is empty"),
    (["--seq-len", "300000"], "--seq-len 300000 is longer than the validation data"),
    (["--mesh", "data=3"], "spans 3 devices but 1 are available"),
    (["--mesh", "model=1"], "AXIS one of data, fsdp, tensor"),
    # The library's own checks, surfaced as the script's error (no second copy of the rule):
    (["--reset-warmup", "600"], "--optimizer spam: warmup_steps (600) must be < reset_interval"),
    (["--b1", "1.5"], "--optimizer spam: b1 must be in [0, 1), got 1.5"),
    (["--optimizer", "stable_spam", "--gamma2", "-0.1"], "gamma2 must be in [0, 1)"),
    (["--density", "1.5"], "density must be in (0, 1]"),
    (["--warmup-steps", "2"], "--warmup-steps (2) must be in [0, schedule steps (2))"),
    (["--optimizer", "adamw", "--density", "0.5"], "--density applies to spam only"),
    (["--dtype", "fp16"], "valid: fp32, bf16, pure_bf16"),
    (["--optimizer", "galore", "--scan-layers"], "--optimizer galore with --scan-layers: GaLore "
                                                 "projects 2-D matrices"),
])
def test_bad_input_is_a_clear_error_before_any_compilation(tmp_path, compiles, flags, message):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n")
  flags = [str(empty) if f == "EMPTY" else f for f in flags]
  jax.random.key(0)  # the optimizer's key: compiled once per process, whichever test runs first
  before = compiles.count
  with pytest.raises(ConfigError) as info:
    main(FAST + ["--workdir", str(tmp_path / "w"), "--steps", "2"] + flags)
  assert message in str(info.value)
  assert compiles.count == before  # nothing was compiled
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_cli_bad_input_exits_2_with_the_message(tmp_path):
  proc = run_cli(["--optimizer", "sgdd", "--workdir", str(tmp_path)])
  assert proc.returncode == 2
  assert "error: unknown --optimizer 'sgdd'; valid: spam," in proc.stderr
  assert "Traceback" not in proc.stderr


def toy_params():
  rng = np.random.default_rng(0)
  return {
      "embed": {"embedding": jnp.asarray(rng.normal(size=(10, 8)), jnp.float32)},
      "layers": {0: {"attn": {"q_proj": {"kernel": jnp.asarray(rng.normal(size=(8, 16)),
                                                                jnp.float32)}},
                     "input_norm": {"weight": jnp.ones(8)}}},
  }


@pytest.mark.parametrize("optimizer,density", [("spam", 1.0), ("spam", 0.5), ("spam_clip_norm", 1.0)])
def test_logged_spikes_are_the_optimizers_own_count(optimizer, density):
  """The step logs SPAM's num_clipped (tests/test_num_clipped.py checks it is exact), nothing else."""
  cfg = Config(optimizer=optimizer, threshold=50.0, reset_interval=40, reset_warmup=5,
               clip_delay=3, density=density)
  params = toy_params()
  tx, _ = optimizers.build_optimizer(cfg)
  state = tx.init(params)
  rng = np.random.default_rng(1)
  for step in range(12):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    if step == 10:
      grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].multiply(1e3), grads)
    _, state = tx.update(grads, state, params)
  logged = spike_report.step_metrics(state)
  assert set(logged) == {"spikes"}
  assert int(logged["spikes"]) == int(optax.tree.get(state, "num_clipped")) > 0


def test_logged_skipped_is_the_skip_transforms_own_flag():
  """adamw_skip logs skipped = 1 on the outlier step only (the library's last_skipped)."""
  params = toy_params()
  tx, _ = optimizers.build_optimizer(Config(optimizer="adamw_skip", skip_window=8, skip_sigma=3.0))
  state = tx.init(params)
  rng = np.random.default_rng(0)
  logged = []
  for step in range(12):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    if step == 10:
      grads = jax.tree.map(lambda g: 1e3 * g, grads)
    _, state = tx.update(grads, state, params)
    metrics = spike_report.step_metrics(state)
    assert set(metrics) == {"skipped"}
    logged.append(int(metrics["skipped"]))
  assert logged == [0] * 10 + [1, 0]
  assert int(optax.tree.get(state, "total_skipped")) == 1


def test_no_spike_metrics_for_optimizers_without_a_clip():
  params = toy_params()
  tx, _ = optimizers.build_optimizer(Config(optimizer="adamw"))
  assert spike_report.step_metrics(tx.init(params)) == {}
  tx, _ = optimizers.build_optimizer(Config(optimizer="adamw", spike_monitor=50.0))
  assert set(spike_report.step_metrics(tx.init(params))) == {
      "spikes_embedding", "spikes_attention", "spikes_ffn", "spikes_norm", "spikes_lm_head"}


def test_spike_injection_modes():
  grads = {"w": jnp.ones((50, 40))}
  key = jax.random.key(0)
  out, n = inject_spikes(Config(spike_prob=1.0, spike_scale=100.0), key, grads=grads)
  assert int(n) == 1 and float(out["w"][0, 0]) == 100.0
  out, n = inject_spikes(Config(spike_prob=0.0, spike_scale=100.0), key, grads=grads)
  assert int(n) == 0 and float(out["w"].max()) == 1.0
  out, n = inject_spikes(Config(spike_prob=0.1, spike_scale=1e3, spike_mode="grad_entries"), key,
                         grads=grads)
  assert 100 < int(n) < 300 and int(jnp.sum(out["w"] == 1e3)) == int(n)
  tokens = jnp.zeros((64, 33), jnp.int32)
  out, n = inject_spikes(Config(spike_prob=0.5, spike_scale=1.0, spike_mode="input"), key,
                         tokens=tokens, vocab_size=1000)
  assert int(jnp.sum(out[:, -1])) == 0  # the last target is never an input: untouched
  hit_rows = int(jnp.sum(jnp.any(out[:, :-1] != 0, axis=1)))
  assert 16 < hit_rows < 48 and 0 < int(n) <= hit_rows * 32


def test_validation_loss_is_token_weighted_over_batches():
  # a batch of 1 target token at NLL 10 and one of 3 tokens at NLL 2: (10 + 6) / 4, not (10 + 2) / 2
  sums = {0: (10.0, 1.0), 1: (6.0, 3.0)}
  loss, tokens = evaluate.mean_nll(lambda params, b: sums[b], None, [0, 1])
  assert (loss, tokens) == (4.0, 4)
  assert evaluate.mean_nll(lambda params, b: sums[b], None, []) == (0.0, 0)


def test_lr_schedule_is_linear_warmup_then_cosine_to_ten_percent():
  sched = optimizers.lr_schedule(Config(lr=1e-3, steps=1000, warmup_steps=100))
  assert float(sched(0)) == 0.0
  assert float(sched(50)) == pytest.approx(5e-4)
  assert float(sched(100)) == pytest.approx(1e-3)
  assert float(sched(550)) == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-4)
  assert float(sched(1000)) == pytest.approx(1e-4)
  assert Config(steps=20000).lr_warmup_steps == 1000 and Config(steps=400).lr_warmup_steps == 40


def test_projection_mask_selects_attention_and_mlp_kernels_only():
  mask = optimizers.projection_mask(toy_params())
  assert mask["layers"][0]["attn"]["q_proj"]["kernel"] is True
  assert mask["embed"]["embedding"] is False and mask["layers"][0]["input_norm"]["weight"] is False


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_on_the_menu_updates_parameters(name):
  cfg = Config(optimizer=name, lr=1e-2, warmup_steps=0, steps=10, galore_rank=2, galore_gap=2)
  tx, _ = optimizers.build_optimizer(cfg)
  params = toy_params()
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params, toy_params())
  assert all(np.isfinite(v) and v > 0 for v in jax.tree.leaves(moved)), moved


def test_parse_mesh():
  assert parse_mesh(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert parse_mesh("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert parse_mesh("fsdp=2, tensor=2", 4) == {"data": 1, "fsdp": 2, "tensor": 2}
  for bad, message in [("data=2,data=4", "twice"), ("data=x", "positive integer"),
                       ("data=0,fsdp=8", ">= 1"), ("data", "AXIS=SIZE")]:
    with pytest.raises(ConfigError, match=message):
      parse_mesh(bad, 8)


def test_multihost_environment_detection(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
              "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert multihost_environment() is None
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  assert multihost_environment() is None  # a single TPU VM
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert "TPU pod (2 hosts)" == multihost_environment()
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  monkeypatch.setenv("SLURM_JOB_ID", "123")
  assert multihost_environment().startswith("SLURM")


def test_metrics_writer_truncates_on_resume_and_plots(tmp_path):
  writer = MetricsWriter(tmp_path / "metrics.jsonl")
  writer.write([{"step": s, "loss": 5.0 - s / 10} for s in range(1, 11)])
  writer.write([{"step": 10, "val_loss": 4.0, "val_ppl": float(np.exp(4.0))}])
  writer.write([{"step": 11, "loss": float("nan")}])
  records = read_metrics(tmp_path / "metrics.jsonl")
  assert records[-1]["loss"] == "nan"  # still valid JSON
  writer.truncate_after(6)
  assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 7))
  png = plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
  assert png.read_bytes()[:4] == b"\x89PNG"
  MetricsWriter(tmp_path / "other.jsonl", enabled=False).write([{"step": 1, "loss": 1.0}])
  assert not (tmp_path / "other.jsonl").exists()
  json.dumps(records)


@pytest.mark.slow
def test_the_default_main_job_learns_shakespeare(tmp_path):
  """``python -m train`` with no arguments (only the workdir moved): a few minutes on 2 cores."""
  proc = subprocess.run([sys.executable, "-m", "train", "--workdir", str(tmp_path / "w"),
                         "--no-progress"], cwd=REPO, capture_output=True, text=True,
                        timeout=1800, env=_jax_cache.subprocess_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = [l for l in proc.stdout.splitlines() if l.startswith("final validation")][-1]
  ppl = float(final.rsplit("perplexity", 1)[1])
  assert ppl < 7.0, final  # byte-level: uniform is 256, unigram ~ 20


def test_spike_monitor_logs_per_layer_type_and_writes_the_report(tmp_path):
  work = tmp_path / "run"
  main(["--steps", "12", "--batch-size", "4", "--seq-len", "16", "--eval-every", "12",
        "--sample-tokens", "0",
        "--checkpoint-every", "6", "--log-every", "3", "--eval-batches", "1", "--no-progress",
        "--spike-monitor", "5", "--workdir", str(work)])
  records = [r for r in read_metrics(work / "metrics.jsonl") if "loss" in r]
  types = ("embedding", "attention", "ffn", "norm", "lm_head")
  assert all(f"spikes_{t}" in r for r in records for t in types)
  totals = [json.loads(l) for l in (work / "spike_layers.jsonl").read_text().splitlines()]
  assert [t["step"] for t in totals] == [3, 6, 9, 12]
  # the per-step counts by type add up to the cumulative per-tensor totals
  assert sum(r[f"spikes_{t}"] for r in records for t in types) == sum(totals[-1]["totals"].values())
  assert "layers/0/attn/q_proj/kernel" in totals[-1]["totals"]
  report = (work / "spike_report.md").read_text()
  assert all(f"| {t} |" in report for t in types)
  assert (work / "spike_heatmap.png").stat().st_size > 1000
  # resuming to a longer run continues the per-tensor log from the checkpoint
  main(["--steps", "15", "--batch-size", "4", "--seq-len", "16", "--eval-every", "12",
        "--sample-tokens", "0",
        "--checkpoint-every", "6", "--log-every", "3", "--eval-batches", "1", "--no-progress",
        "--spike-monitor", "5", "--workdir", str(work), "--schedule-steps", "12"])
  steps = [json.loads(l)["step"] for l in (work / "spike_layers.jsonl").read_text().splitlines()]
  assert steps == [3, 6, 9, 12, 15]


def test_spike_defence_rows_are_the_documented_chains():
  """adamw_clip_norm / adamw_zclip / adamw_skip / spam_clip_norm wrap the plain rows as documented."""
  params, cfg = toy_params(), Config(lr=1e-2, warmup_steps=0, steps=10, skip_window=4, skip_sigma=1.0)
  spike = jax.tree.map(lambda p: 1e3 * jnp.ones_like(p), params)
  ones = jax.tree.map(jnp.ones_like, params)
  small = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)

  def run(name, grads_seq, **changes):
    tx, _ = optimizers.build_optimizer(cfg.replace(optimizer=name, **changes))
    state = tx.init(params)
    for g in grads_seq:
      u, state = jax.jit(tx.update)(g, state, params)
    return u, state

  # global-norm clipping at 1.0 makes a x1000 gradient the same update as a unit-norm one
  for clipped, plain in (("adamw_clip_norm", "adamw"), ("spam_clip_norm", "spam")):
    u_spike, _ = run(clipped, [spike])
    norm = float(optax.tree.norm(spike))
    u_unit, _ = run(plain, [jax.tree.map(lambda g: g / (norm + 1e-6), spike)])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9), u_spike, u_unit)
  # ZClip's cap (max_grad_norm 1.0) applies from the first step
  _, state = run("adamw_zclip", [spike])
  zstate = optax.tree.get(state, "ZClipState")
  assert int(zstate.count) == 1
  # the skip row: after a quiet history, a x1000 step returns zero updates and keeps AdamW's state
  u, state = run("adamw_skip", [ones, small, ones, small, spike])
  assert bool(state.last_skipped) and int(state.total_skipped) == 1
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
  assert int(state.inner_state[0].count) == 4  # AdamW saw the 4 quiet steps only


def test_the_train_step_gives_the_loss_to_the_step_skip_rule():
  # MaxText's rule tests the loss as well as the gradient norm: the training step passes its loss
  # to the optimizer (an extra argument every other transform ignores).
  from flax import nnx

  import models
  from train.step import make_train_step
  cfg = Config(optimizer="adamw_skip", steps=4, warmup_steps=0, seq_len=8, batch_size=2)
  model_cfg = models.get_config("tiny").replace(vocab_size=32)
  graphdef, params = nnx.split(models.make_model(model_cfg), nnx.Param)
  params = nnx.to_pure_dict(params)
  tx, schedule = optimizers.build_optimizer(cfg)
  state = {"step": jnp.zeros([], jnp.int32), "params": params, "opt_state": tx.init(params)}
  step = jax.jit(make_train_step(cfg, graphdef, tx, schedule, 32))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 9)), jnp.int32)
  batch = {"tokens": tokens, "weights": jnp.ones((2, 8), jnp.float32)}
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(np.asarray(state["opt_state"].losses[:3]), losses, rtol=1e-6)


def test_state_rounding_reaches_spam_and_stable_spam(tmp_path):
  assert parse_args(["--state-rounding", "nearest"]).state_rounding == "nearest"
  assert Config().state_rounding == "stochastic"
  params = toy_params()
  grads = jax.tree.map(lambda p: 0.37 * jnp.ones_like(p), params)
  for name in ("spam", "stable_spam"):
    nus = {}
    for rounding in ("stochastic", "nearest"):
      cfg = Config(optimizer=name, opt_state_dtype="bfloat16", state_rounding=rounding, steps=10)
      tx, _ = optimizers.build_optimizer(cfg)
      state = tx.init(params)
      for _ in range(20):
        _, state = jax.jit(tx.update)(grads, state, params)
      cls = "ScaleBySpamAdamState" if name == "spam" else "ScaleByStableSpamAdamState"
      nu = optax.tree.get(state, cls).nu
      assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nu))
      nus[rounding] = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(nu)])
    assert not np.array_equal(nus["stochastic"], nus["nearest"]), name
  with pytest.raises(ConfigError, match="unknown --state-rounding 'down'; valid: stochastic, "):
    main(FAST + ["--state-rounding", "down", "--steps", "1", "--workdir", str(tmp_path / "w")])
  assert not (tmp_path / "w").exists()


def test_running_out_of_memory_is_a_clear_error_naming_batch_and_sequence(tmp_path):
  # The attention scores of 8 x 100000 tokens (terabytes) cannot be allocated: the first step says
  # which sizes to lower instead of ending in XLA's RESOURCE_EXHAUSTED traceback.
  with pytest.raises(ConfigError, match=r"out of device memory with --batch-size 8 and --seq-len "
                                        r"100000 .* lower --batch-size or --seq-len, or .*--remat"):
    main(FAST + ["--seq-len", "100000", "--steps", "1", "--workdir", str(tmp_path / "w")])
