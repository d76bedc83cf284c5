"""benchmarks/vs_torch.py runs end to end on tiny shapes (``--smoke``) and prints its three tables."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks import vs_torch  # noqa: E402


def test_vs_torch_smoke(tmp_path, capsys):
  out = vs_torch.main(["--smoke", "--json", str(tmp_path / "v.json")])
  assert {r["part"] for r in out["speed"]} == {"step", "fwd+bwd"}
  assert all(r["jax_ms"] > 0 and r["torch_ms"] > 0 and r["ratio"] > 0 for r in out["speed"])
  none, block = out["memory"]
  assert block["temp_mb"] < none["temp_mb"]
  assert [r["layers"] for r in out["compile_depth"]] == [1, 2]
  printed = capsys.readouterr().out
  assert "| tiny (vocab 64) | 2x16 | fp32 |" in printed and "| scan | 2 |" in printed
