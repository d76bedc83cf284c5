"""Where the numbers go: ``metrics.jsonl``, TensorBoard event files, and the loss-curve plot.

Process 0 writes every record twice: one JSON object per line in ``WORKDIR/metrics.jsonl`` (read
by the benchmarks and tests) and the same scalars as TensorBoard events in ``WORKDIR/tensorboard``
(``tensorboard --logdir WORKDIR``), through ``tensorboardX``. A resumed run drops what was logged
after its checkpoint from both, so neither shows a step twice.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _clean(value):
  """JSON-safe scalars: NaN/inf become strings so the file stays valid JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsWriter:
  """Appends records to ``metrics.jsonl`` (and TensorBoard); a no-op on processes other than 0.

  ``tensorboard``: the event directory, or None for the JSON lines alone.
  """

  def __init__(self, path: str | Path, enabled: bool = True, tensorboard: str | Path | None = None):
    self.path = Path(path)
    self.enabled = enabled
    self.tensorboard = Path(tensorboard) if tensorboard is not None else None
    self._events = None

  def _event_writer(self, purge_step: int | None = None):
    if self._events is None and self.tensorboard is not None:
      from tensorboardX import SummaryWriter
      self._events = SummaryWriter(str(self.tensorboard), purge_step=purge_step)
    return self._events

  def truncate_after(self, step: int) -> None:
    """Drops records past `step`: a resumed run re-logs the steps after its checkpoint."""
    if not self.enabled:
      return
    if self.tensorboard is not None and self.tensorboard.exists():
      self._event_writer(purge_step=step + 1)  # TensorBoard hides the events past `step`
    if not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, self.path)

  def write(self, records: list[dict]) -> None:
    if not self.enabled or not records:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with self.path.open("a") as f:
      for record in records:
        f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
    events = self._event_writer()
    if events is not None:
      for record in records:
        for name, value in record.items():
          if name != "step" and isinstance(value, (int, float)):
            events.add_scalar(name, value, global_step=record["step"])

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


def read_metrics(path: str | Path) -> list[dict]:
  path = Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curves(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path | None:
  """Train loss (raw and smoothed) and validation loss against step, saved as a PNG."""
  records = read_metrics(metrics_path)
  train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
  val = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), (int, float))]
  if not train and not val:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  if train:
    steps, losses = zip(*train)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
    smooth, ema = [], 0.0
    for n, x in enumerate(losses, 1):
      ema = 0.95 * ema + 0.05 * x
      smooth.append(ema / (1 - 0.95 ** n))  # bias-corrected: no lag from a zero start
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.6, label="train loss (EMA 0.95)")
  if val:
    steps, losses = zip(*val)
    ax.plot(steps, losses, "o-", color="tab:orange", linewidth=1.6, label="validation loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  out_path = Path(out_path)
  fig.savefig(out_path)
  plt.close(fig)
  return out_path
