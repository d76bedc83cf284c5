"""The run's gradient-spike numbers, all read from the optimizer state; the per-layer report.

Every train step logs ``spikes``: the gradient entries the optimizer's spike clip clipped in that
update (SPAM's ``num_clipped``, counted by the library), whenever its state has one, and
``skipped`` (1 when ``skip_step_on_spikes`` skipped the update) whenever it has that transform.

With ``--spike-monitor θ`` the optimizer is ``chain(spam.spike_monitor(θ), optimizer)``. Each train
step reports the spikes of that step per layer type (metrics.jsonl: ``spikes_<type>``); at every log
point the cumulative per-tensor counts are appended to ``spike_layers.jsonl``, and at the end of the
run :func:`write_report` turns them into ``spike_report.md`` (counts and spikes per parameter by layer
type, as the paper's Table 4, and per tensor) and ``spike_heatmap.png`` (spikes per tensor over steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import spam_optax as spam


def step_metrics(opt_state) -> dict[str, jax.Array]:
  """Inside the jitted step: this update's spike numbers, as int32 scalars.

  ``spikes`` (entries clipped, from the state's ``num_clipped``) when the optimizer clips spikes;
  ``skipped`` (the state's ``last_skipped``) when it skips outlier steps; ``spikes_<layer type>``
  when it has a ``spike_monitor``.
  """
  out = {}
  clipped = optax.tree.get(opt_state, "num_clipped")
  if clipped is not None:
    out["spikes"] = clipped
  skipped = optax.tree.get(opt_state, "last_skipped")
  if skipped is not None:
    out["skipped"] = skipped.astype(jnp.int32)
  if optax.tree.get(opt_state, "SpikeMonitorState") is not None:
    out.update(step_counts_by_type(opt_state))
  return out


def step_counts_by_type(opt_state) -> dict[str, jax.Array]:
  """Inside the jitted step: spikes of this update per layer type, as int32 scalars."""
  last = spam.spike_counts(opt_state, "last")
  total = lambda xs: sum((jnp.sum(x, dtype=jnp.int32) for x in xs), jnp.zeros([], jnp.int32))
  return {f"spikes_{t}": v for t, v in spam.group_by_layer_type(last, combine=total).items()}


def tensor_name(path) -> str:
  """``layers/0/attn/q_proj/kernel`` for a key path."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def per_tensor_totals(opt_state) -> dict[str, int]:
  """On the host: cumulative spikes per parameter tensor, keyed by its path."""
  totals = jax.device_get(spam.spike_counts(opt_state, "total"))
  flat = jax.tree_util.tree_flatten_with_path(totals)[0]
  return {tensor_name(path): int(np.sum(x)) for path, x in flat}


def append_totals(path: Path, step: int, totals: dict[str, int]) -> None:
  with path.open("a") as f:
    f.write(json.dumps({"step": step, "totals": totals}) + "\n")


def truncate_after(path: Path, step: int) -> None:
  """A resumed run re-logs the steps after its checkpoint."""
  if path.exists():
    kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    path.write_text("".join(l + "\n" for l in kept))


def write_report(workdir: Path, params, threshold: float) -> tuple[Path, Path | None] | None:
  """spike_report.md and spike_heatmap.png from spike_layers.jsonl; None if nothing was logged."""
  log = workdir / "spike_layers.jsonl"
  if not log.exists():
    return None
  records = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
  if not records:
    return None
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  sizes = {tensor_name(p): int(np.size(x)) for p, x in flat}
  kinds = {tensor_name(p): spam.layer_type(p) for p, _ in flat}
  names = [n for n in sizes if n in records[-1]["totals"]]
  final = records[-1]["totals"]

  by_type: dict[str, list[int]] = {}
  for n in names:
    acc = by_type.setdefault(kinds[n], [0, 0])
    acc[0] += final[n]
    acc[1] += sizes[n]
  lines = [f"# Gradient spikes (online score g²/v > {threshold:g}), steps 1-{records[-1]['step']}", "",
           "| layer type | #params | #spikes | spikes / param |", "|---|---|---|---|"]
  for t, (count, size) in by_type.items():
    lines.append(f"| {t} | {size:,} | {count:,} | {count / max(size, 1):.4g} |")
  lines += ["", "| tensor | type | #params | #spikes | spikes / param |", "|---|---|---|---|---|"]
  for n in names:
    lines.append(f"| `{n}` | {kinds[n]} | {sizes[n]:,} | {final[n]:,} | {final[n] / max(sizes[n], 1):.4g} |")
  report = workdir / "spike_report.md"
  report.write_text("\n".join(lines) + "\n")

  heatmap = None
  if len(records) > 1:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    cum = np.array([[r["totals"].get(n, 0) for r in records] for n in names], dtype=np.float64)
    per_window = np.diff(cum, axis=1, prepend=0.0)
    fig, ax = plt.subplots(figsize=(10, 0.22 * len(names) + 1.5))
    im = ax.imshow(np.log10(1 + per_window), aspect="auto", interpolation="nearest", cmap="magma")
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).astype(int)
    ax.set_xticks(ticks, [steps[i] for i in ticks])
    ax.set_xlabel("step (end of logging window)")
    ax.set_title(f"spikes per tensor per logging window (g²/v > {threshold:g}), log10(1 + count)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    heatmap = workdir / "spike_heatmap.png"
    fig.savefig(heatmap, dpi=110)
    plt.close(fig)
  return report, heatmap
