"""The quality, spike and ablation benchmarks run end to end for a few steps (``--smoke``).

The full runs are benchmarks, not tests (see benchmarks/QUALITY.md); here each script trains a few
steps of the tiny model on short sequences, in-process, and must print its table.
"""

import json
import math

import pytest

from benchmarks import ablations, bf16_state_quality, quality, quant_quality, spikes, update_rms


def test_quality_smoke(tmp_path, capsys):
  store = quality.main(["--smoke", "--json", str(tmp_path / "q.json")])
  runs = store.runs()
  assert {r["row"] for r in runs} == {"adam", "spam", "scale"}
  for r in runs:
    assert math.isfinite(r["val_loss"]) and r["state_bytes"] > 0 and r["step_ms"] > 0
  out = capsys.readouterr().out
  assert "| scale |" in out and "optimizer state" in out
  # SCALE's only state is the output layer's momentum: far less than Adam's two moments.
  by_row = {r["row"]: r["state_bytes"] for r in runs}
  assert by_row["scale"] < by_row["adam"] / 4


def test_spikes_smoke(tmp_path, capsys):
  spikes.main(["--smoke", "--json", str(tmp_path / "s.json"), "--severities", "input=0.3"])
  out = capsys.readouterr().out
  assert "input (p = 0.1)" in out and "| spam |" in out and "severity 0.3" in out
  runs = json.loads((tmp_path / "s.json").read_text())["runs"].values()
  assert {r["overrides"].get("spike_scale") for r in runs} == {None, 0.3}
  for r in runs:  # the steps that had a corrupted input, each counted in `injected`
    assert all(1 <= s <= r["steps"] for s in r["injected_steps"])
    assert len(r["injected_steps"]) <= r["injected"]
    assert bool(r["injected_steps"]) == (r["injected"] > 0) == ("spike_mode" in r["overrides"])
  # Rows run by another process into their own file join the report (--also-json).
  spikes.main(["--smoke", "--json", str(tmp_path / "s2.json"), "--severities", "input=0.3",
               "--rows", "adam"])
  capsys.readouterr()
  spikes.main(["--smoke", "--json", str(tmp_path / "s.json"), "--severities", "input=0.3",
               "--rows", "spam,adam", "--also-json", str(tmp_path / "s2.json"), "--report-only"])
  out = capsys.readouterr().out
  assert "| spam |" in out and "| adam |" in out and "| adam | 3e-3 | - |" not in out


def test_ablations_smoke(tmp_path, capsys):
  ablations.main(["--smoke", "--json", str(tmp_path / "a.json")])
  out = capsys.readouterr().out
  assert "restarted at each reset" in out and "clip (unfused chain)" in out


def test_quant_quality_smoke(tmp_path, capsys):
  store = quant_quality.main(["--smoke", "--json", str(tmp_path / "qq.json")])
  runs = store.runs()
  assert [(r["row"], r["overrides"]["quant"]) for r in runs] == [("int4/stable_spam", "int4")]
  assert all(math.isfinite(r["val_loss"]) for r in runs)
  stable = [r for r in runs if r["row"] == "int4/stable_spam"][0]["overrides"]
  assert (stable["gamma1"], stable["gamma2"], stable["gamma3"]) == (0.7, 0.9, 0.999)
  assert stable["stable_reset_interval"] == 500
  out = capsys.readouterr().out
  assert "| int4/stable_spam | int4 | stable_spam |" in out and "diverged runs" in out


def test_bf16_state_quality_smoke(tmp_path, capsys):
  store = bf16_state_quality.main(["--smoke", "--json", str(tmp_path / "bs.json")])
  runs = {r["row"]: r for r in store.runs()}
  assert set(runs) == {"fp32_state", "bf16_stochastic", "bf16_nearest"}
  for r in runs.values():
    assert r["overrides"]["dtype"] == "pure_bf16" and r["overrides"]["optimizer"] == "spam"
    assert r["lr"] == 1e-3 and math.isfinite(r["val_loss"])
  assert runs["bf16_nearest"]["overrides"]["state_rounding"] == "nearest"
  # bf16 moments: half of the float32 state (up to the two int32 counts).
  assert abs(runs["bf16_stochastic"]["state_bytes"] - runs["fp32_state"]["state_bytes"] / 2) < 64
  out = capsys.readouterr().out
  assert "| bf16 | bfloat16 | nearest | 1 |" in out and "paired by seed" in out


def test_nullify_zeroes_what_clip_clips():
  import jax.numpy as jnp
  g0 = {"w": jnp.full((4,), 1.0)}
  spike = {"w": jnp.array([1.0, 1.0, 1e4, -1e4])}
  outs = {}
  for mode in ("clip", "nullify"):
    tx = quality.spike_filter(mode, 5000.0, b2=0.999, reset_interval=500, clip_delay=2)
    state = tx.init(g0)
    for _ in range(3):
      _, state = tx.update(g0, state)
    outs[mode], _ = tx.update(spike, state)
  assert outs["clip"]["w"][0] == outs["nullify"]["w"][0] == 1.0
  assert float(outs["nullify"]["w"][2]) == float(outs["nullify"]["w"][3]) == 0.0
  assert 0 < float(outs["clip"]["w"][2]) < 1e4 and float(outs["clip"]["w"][3]) < 0


def test_update_rms_smoke(tmp_path, capsys):
  store = update_rms.main(["--smoke", "--json", str(tmp_path / "u.json")])
  runs = {row: seeds["0"] for row, seeds in store["runs"].items()}
  assert set(runs) == {"adam", "spam", "spam_restart_bc", "adam_lr_x1.6"}
  assert all(math.isfinite(r["val_loss"]) for r in runs.values())
  steps = store["meta"]["steps"]
  assert all(len(r["effective"]) == steps and len(r["loss"]) == steps for r in runs.values())
  # The reset updates (k = 5, 10: indices 4, 9) get SPAM's warmup factor 0.01: a tiny step.
  spam = runs["spam"]["effective"]
  assert spam[4] < 0.05 * spam[3] and spam[9] < 0.05 * spam[8]
  out = capsys.readouterr().out
  assert "spam direction / Adam" in out and "before the first reset" in out



@pytest.mark.parametrize("row,optimizer", [("spam_proj_x0.25", "spam"), ("adamw_proj_x0.25", "adamw")])
def test_projections_scaled_control(row, optimizer):
  """The controls are the dense optimizer with the projection kernels' updates x 0.25, the rest
  unchanged."""
  import jax
  import jax.numpy as jnp
  from train.config import Config
  params = {"embed": {"embedding": jnp.ones((8, 4))},
            "layers_0": {"attn": {"q_proj": {"kernel": jnp.ones((4, 4))}},
                         "mlp": {"down_proj": {"kernel": jnp.ones((6, 4))}},
                         "norm": {"scale": jnp.ones(4)}}}
  grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), params)
  cfg = Config(optimizer=optimizer, lr=1e-3, steps=20, weight_decay=0.1)
  updates = {}
  for name, (tx, _) in {"control": quality.CUSTOM[row](cfg),
                        "dense": quality.optimizers.build_optimizer(cfg)}.items():
    state = tx.init(params)
    for _ in range(3):  # past the schedule's first step (LR 0), so updates are nonzero
      updates[name], state = tx.update(grads, state, params)
  flat = {jax.tree_util.keystr(p): (c, d) for (p, c), d in zip(
      jax.tree_util.tree_leaves_with_path(updates["control"]),
      jax.tree_util.tree_leaves(updates["dense"]))}
  assert len(flat) == 4
  for key, (c, d) in flat.items():
    expected = 0.25 if "proj" in key else 1.0
    assert float(jnp.abs(d).max()) > 0
    assert jnp.allclose(c, expected * d, rtol=1e-6), key
