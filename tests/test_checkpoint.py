"""Checkpoints: PRNG keys survive, resume is exact, bad checkpoints fail loudly and stay untouched."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _jax_cache
import spam_optax as spam
from train import main
from train.checkpoint import CheckpointError, Checkpointer, from_savable, to_savable

_jax_cache.enable()
REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1",
        "--no-progress", "--no-plot", "--sample-tokens", "0", "--eval-every", "1000", "--log-every", "4"]


def sparse_state():
  params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(3)}
  tx = spam.spam(1e-3, density=0.5, key=jax.random.key(42), count_clipped=True)  # as train
  return {"step": jnp.asarray(3, jnp.int32), "params": params, "opt_state": tx.init(params)}


def key_leaves(tree):
  return [x for x in jax.tree.leaves(tree)
          if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


def test_savable_form_stores_keys_as_data_and_round_trips():
  state = sparse_state()
  nested, impls = to_savable(state)
  leaves = jax.tree.leaves(nested)
  assert not key_leaves(nested) and all(isinstance(x, jax.Array) for x in leaves)
  assert list(impls.values()) == ["threefry2x32"]
  back = from_savable(nested, state, impls)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  (k,) = key_leaves(back)
  np.testing.assert_array_equal(jax.random.key_data(k), jax.random.key_data(jax.random.key(42)))


def test_checkpointer_restores_typed_keys_and_never_overwrites(tmp_path):
  state = sparse_state()
  ckpt = Checkpointer(tmp_path / "ck", keep=0, async_save=False)
  assert ckpt.save(3, state, {"compat": {"a": 1}})
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored, meta = ckpt.restore(3, abstract, {"a": 1})
  assert meta["step"] == 3
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  before = tree_digest(tmp_path / "ck")
  changed = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, state)
  assert ckpt.save(3, changed, {"compat": {"a": 1}}) is False  # existing step: kept as is
  assert tree_digest(tmp_path / "ck") == before
  with pytest.raises(CheckpointError, match=str(tmp_path / "ck" / "3") + ".*incompatible"):
    ckpt.restore(3, abstract, {"a": 2})
  ckpt.close()


def tree_digest(root: Path) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def read_metrics(workdir: Path) -> list[dict]:
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [[], ["--density", "0.25"],
                                   ["--scan-layers", "--optimizer", "stable_spam",
                                    "--stable-reset-interval", "6"]],
                         ids=["dense", "density0.25", "scanned_stable_spam"])
def test_resume_is_identical_to_an_uninterrupted_run(tmp_path, extra):
  # Short SPAM cycles so that resets (and, sparse, re-drawn subsets) happen after the resume.
  args = FAST + ["--reset-interval", "6", "--reset-warmup", "2", "--clip-delay", "2",
                 "--schedule-steps", "16", "--checkpoint-every", "4"] + extra
  whole = main(args + ["--workdir", str(tmp_path / "a"), "--steps", "16"])
  first = main(args + ["--workdir", str(tmp_path / "b"), "--steps", "9"])
  resumed = main(args + ["--workdir", str(tmp_path / "b"), "--steps", "16"])
  assert resumed.start_step == 9 and first.final_step == 9
  pieces = {**first.losses, **resumed.losses}
  assert sorted(pieces) == list(range(1, 17))
  assert [pieces[s] for s in range(1, 17)] == [whole.losses[s] for s in range(1, 17)]
  assert resumed.val_loss == whole.val_loss
  # metrics.jsonl of the resumed workdir: each step once, same numbers.
  a = [r for r in read_metrics(tmp_path / "a") if "loss" in r]
  b = [r for r in read_metrics(tmp_path / "b") if "loss" in r]
  assert [r["step"] for r in b] == list(range(1, 17))
  assert [(r["loss"], r.get("spikes")) for r in a] == [(r["loss"], r.get("spikes")) for r in b]


def test_interrupted_run_resumes_from_the_last_checkpoint_and_rewrites_metrics(tmp_path):
  work = tmp_path / "w"
  main(FAST + ["--workdir", str(work), "--steps", "6", "--checkpoint-every", "4"])
  # Simulate a crash after step 6: drop the final checkpoint, keep the metrics of steps 5-6.
  import shutil
  shutil.rmtree(work / "checkpoints" / "6")
  again = main(FAST + ["--workdir", str(work), "--steps", "6", "--checkpoint-every", "4"])
  assert again.start_step == 4 and sorted(again.losses) == [5, 6]
  steps = [r["step"] for r in read_metrics(work) if "loss" in r]
  assert steps == list(range(1, 7))


def corrupt_state_files(step_dir: Path) -> None:
  for path in step_dir.joinpath("state").rglob("*"):
    if path.is_file() and "/d/" in str(path):
      data = bytearray(path.read_bytes())
      data[::7] = bytes(b ^ 0xFF for b in data[::7])
      path.write_bytes(bytes(data))


# orbax's async reader threads report "Event loop is closed" after the failed read: noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_is_a_clear_error_and_is_left_alone(tmp_path):
  work = tmp_path / "w"
  main(FAST + ["--workdir", str(work), "--steps", "2"])
  step_dir = work / "checkpoints" / "2"
  corrupt_state_files(step_dir)
  before = tree_digest(work / "checkpoints")
  with pytest.raises(CheckpointError, match=f"checkpoint {step_dir} is corrupt"):
    main(FAST + ["--workdir", str(work), "--steps", "4"])
  assert tree_digest(work / "checkpoints") == before
  # Garbled metadata too.
  (step_dir / "meta" / "metadata").write_text("{not json")
  with pytest.raises(CheckpointError, match=f"checkpoint {step_dir} is corrupt"):
    main(FAST + ["--workdir", str(work), "--steps", "4"])


def test_incompatible_checkpoint_names_path_and_differences(tmp_path):
  work = tmp_path / "w"
  main(FAST + ["--workdir", str(work), "--steps", "2"])
  before = tree_digest(work / "checkpoints")
  with pytest.raises(CheckpointError) as info:
    main(FAST + ["--workdir", str(work), "--steps", "4", "--model", "9m"])
  message = str(info.value)
  assert str(work.absolute() / "checkpoints" / "2") in message and "incompatible" in message
  assert "num_layers" in message
  with pytest.raises(CheckpointError, match="density"):
    main(FAST + ["--workdir", str(work), "--steps", "4", "--density", "0.5"])
  with pytest.raises(CheckpointError, match="'layer_storage': 'stacked'"):  # stacked weights
    main(FAST + ["--workdir", str(work), "--steps", "4", "--scan-layers"])
  assert tree_digest(work / "checkpoints") == before


def test_cli_reports_a_corrupt_checkpoint_with_exit_code_2(tmp_path):
  work = tmp_path / "w"
  main(FAST + ["--workdir", str(work), "--steps", "1"])
  corrupt_state_files(work / "checkpoints" / "1")
  proc = subprocess.run([sys.executable, "-m", "train", *FAST, "--workdir", str(work),
                         "--steps", "2"], cwd=REPO, capture_output=True, text=True,
                        env=_jax_cache.subprocess_env())
  assert proc.returncode == 2
  assert f"error: checkpoint {work.absolute() / 'checkpoints' / '1'} is corrupt" in proc.stderr
  assert "Traceback" not in proc.stderr.split("error:")[-1]


@pytest.mark.parametrize("name", ["spam", "spam_sparse", "stable_spam", "adamw", "adam_clip_norm",
                                  "adafactor", "galore"])
def test_every_optimizer_state_round_trips_through_a_checkpoint(tmp_path, name):
  from train import optimizers
  from train.config import Config

  cfg = Config(optimizer=name.replace("_sparse", ""), density=0.5 if "sparse" in name else 1.0,
               galore_rank=2, warmup_steps=0, steps=10)
  tx, _ = optimizers.build_optimizer(cfg)
  rng = np.random.default_rng(0)
  params = {"embed": {"embedding": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)},
            "layers": {0: {"mlp": {"up_proj": {"kernel": jnp.asarray(rng.normal(size=(4, 8)),
                                                                      jnp.float32)}},
                           "input_norm": {"weight": jnp.ones(4)}}}}
  opt_state = tx.init(params)
  for _ in range(2):
    updates, opt_state = tx.update(jax.tree.map(jnp.sin, params), opt_state, params)
    params = optax.apply_updates(params, updates)
  state = {"step": jnp.asarray(2, jnp.int32), "params": params, "opt_state": opt_state}
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(2, state, {"compat": {}})
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored, _ = ckpt.restore(2, abstract, {})
  ckpt.close()
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_of_the_older_state_layout_is_refused_clearly(tmp_path):
  """Before FORMAT 2, SPAM's state had no num_clipped: such a checkpoint fails with a clear error."""
  import orbax.checkpoint as ocp
  state = sparse_state()
  old = jax.tree.map(lambda x: x, state)  # the same state without num_clipped, as written before
  old["opt_state"] = optax.tree.set(old["opt_state"], num_clipped=None)
  ckpt = Checkpointer(tmp_path / "ck", keep=0, async_save=False)
  tree, impls = to_savable(old)
  ckpt.manager.save(3, args=ocp.args.Composite(  # the meta of the older script: no "format"
      state=ocp.args.StandardSave(tree),
      meta=ocp.args.JsonSave({"compat": {"a": 1}, "step": 3, "key_impls": impls})))
  ckpt.wait()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with pytest.raises(CheckpointError, match=r"state format 1, .* reads format 2: .*num_clipped"):
    ckpt.restore(3, abstract, {"a": 1})
  ckpt.close()
