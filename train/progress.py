"""The live view of a run: per-step metrics gathered in windows, throughput, the progress bar.

The jitted step returns its metrics as device scalars; :class:`StepLog` keeps them and fetches a
window of them at once (every ``--log-every`` steps and before an evaluation), so the host never
waits on the device between steps. Each window's last record carries tokens/s (and MFU when the
device's peak is known); the bar shows them with the loss, the LR and the spikes so far.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax

from train import spike_report, throughput
from train.config import Config
from train.metrics import MetricsWriter


def log(*args) -> None:
  """print() on process 0 only."""
  if jax.process_index() == 0:
    print(*args, flush=True)


class StepLog:
  """Gathers the train steps' metrics, writes them per window, and drives the progress bar."""

  def __init__(self, cfg: Config, writer: MetricsWriter, workdir: Path, start: int,
               tokens_per_step: int, flops_per_token: float):
    self.cfg, self.writer, self.workdir = cfg, writer, workdir
    self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
    self.peak = throughput.device_peak_flops(cfg.peak_flops)
    self.losses: dict[int, float] = {}  # step -> train loss, for the steps of this call
    self.train_seconds = 0.0
    self.spikes = 0
    self._pending: list[tuple[int, dict]] = []
    self._window_start = time.perf_counter()
    self._bar = None
    if cfg.progress and jax.process_index() == 0:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
                       file=sys.stderr, mininterval=0.5, smoothing=0.1)

  def step(self, step: int, metrics: dict, opt_state) -> None:
    """Records a finished step's metrics (device scalars); writes a window every --log-every."""
    self._pending.append((step, metrics))
    if self._bar is not None:
      self._bar.update(1)
    if step % self.cfg.log_every == 0:
      self.flush(opt_state)

  def flush(self, opt_state) -> None:
    """Fetches and writes the pending steps; the window's time counts as training time."""
    if not self._pending:
      return
    fetched = jax.device_get([m for _, m in self._pending])
    elapsed = time.perf_counter() - self._window_start
    self.train_seconds += elapsed
    rate = len(self._pending) * self.tokens_per_step / max(elapsed, 1e-9)
    records = [{"step": s, **{k: v.item() for k, v in m.items()}}
               for (s, _), m in zip(self._pending, fetched)]
    for record in records:
      self.losses[record["step"]] = record["loss"]
      self.spikes += int(record.get("spikes", 0))
    last = records[-1]
    last["tokens_per_s"] = rate
    mfu = throughput.mfu(rate, self.flops_per_token, self.peak, jax.device_count())
    if mfu is not None:
      last["mfu"] = mfu
    self.writer.write(records)
    if self.cfg.spike_monitor > 0 and jax.process_index() == 0:
      spike_report.append_totals(self.workdir / "spike_layers.jsonl", last["step"],
                                 spike_report.per_tensor_totals(opt_state))
    if self._bar is not None:
      self._bar.set_postfix(self._postfix(records, rate, mfu), refresh=False)
    self._pending.clear()
    self.restart_clock()

  def _postfix(self, records: list[dict], rate: float, mfu: float | None) -> dict:
    last = records[-1]
    postfix = {"tok/s": f"{rate:,.0f}", **({} if mfu is None else {"mfu": f"{mfu:.1%}"}),
               "loss": f"{last['loss']:.4f}", "lr": f"{last['lr']:.2e}"}
    if "spikes" in last:
      postfix["spikes"] = self.spikes
    if self.cfg.spike_monitor > 0:  # this window's spikes per layer type: embedding, attention ...
      by_type = {k[len("spikes_"):]: sum(r[k] for r in records)
                 for k in last if k.startswith("spikes_")}
      postfix["gss"] = " ".join(f"{t[:4]}:{n}" for t, n in by_type.items())
    return postfix

  def restart_clock(self) -> None:
    """Starts a new timing window (after an evaluation or a checkpoint, which are not training)."""
    self._window_start = time.perf_counter()

  def validation(self, step: int, loss: float, ppl: float) -> None:
    self.writer.write([{"step": step, "val_loss": loss, "val_ppl": ppl}])
    line = f"step {step}: val loss {loss:.4f}, ppl {ppl:.3f}"
    if self._bar is not None:
      self._bar.write(line, file=sys.stdout)
    else:
      log(line)

  def tokens_per_second(self, steps: int) -> float:
    return steps * self.tokens_per_step / self.train_seconds if self.train_seconds else 0.0

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    self.writer.close()
