"""medcg.compile: the trainer's step compiled for a target from abstract shapes (CPU mesh, and real TPU topologies
through libtpu's compiler when the wheel is installed)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from configs import cg_table3
from medcg.aot import step_compile
from medcg.aot import targets
from medcg.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install \"jax[tpu]==<jax>\"); "
                                  "requirements-test.txt installs it where a wheel matching jax exists")


def _cli(*args, timeout=600):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  return subprocess.run([sys.executable, "-m", "medcg.compile", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _seven_b_width(layers: int = 2, remat: str = "none", **mesh):
  """llava-1.5-7b's widths (vision, projector, 4096-wide LLM, vocab) with `layers` layers per tower."""
  c = cg_table3.get_config("data=medmat,model=llava-1.5-7b")
  c.model.llm.num_layers = layers
  c.model.vision.num_hidden_layers = layers + 1  # vision_select_layer=-2 runs all but the last
  step_compile.set_remat(c, remat)
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: one clear message each, before anything compiles.
# ---------------------------------------------------------------------------------------------------------
def test_unknown_target_lists_the_known_ones():
  r = _cli("--config", "configs/cg_table3.py", "--target", "v9-1024", timeout=120)
  assert r.returncode == 2, r.stderr
  line = r.stderr.strip().splitlines()[-1]
  assert line.startswith("medcg.compile: error: --target='v9-1024' is not a known target")
  assert "v5p-8" in line and "h100x8" in line and "cpu8" in line
  assert "Traceback" not in r.stderr


def test_mesh_whose_product_differs_from_the_device_count():
  c = cg_table3.get_config(None)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 3, 1, 1
  import jax
  with pytest.raises(ConfigError, match=r"needs 3 devices, have 8.*target has 8 devices"):
    step_compile.target_mesh(c, jax.devices()[:8])


def test_missing_backend_names_the_package_and_its_install_line(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(targets.TargetError, match=r"libtpu, which is not installed: pip install \"jax\[tpu\]==\d"):
    targets.check_backend(targets.get("v5e-16"))


@needs_libtpu
def test_a_state_that_cannot_fit_is_refused_with_needed_and_available_bytes():
  c = cg_table3.get_config("data=medmat,model=llava-1.5-13b")  # 13B x 12 bytes of state over 4 chips of 16 GiB
  rep = step_compile.run(c, "v5e-4", with_eval=False, with_flops=False)
  train = rep["train"]
  assert train["fits"] is False and train["compile_s"] == 0.0
  assert train["needed_bytes"] > train["available_bytes"] == rep["usable_bytes"]
  assert 15 * 2 ** 30 < rep["usable_bytes"] <= 16 * 2 ** 30  # libtpu's own limit for a v5e chip
  from medcg.aot import report
  text = report.format_text(rep)
  assert "DOES NOT FIT: needs" in text and "knob:" in text


# ---------------------------------------------------------------------------------------------------------
# The CLI on the 8-device CPU mesh: the whole report, as JSON and as text.
# ---------------------------------------------------------------------------------------------------------
def test_cli_cpu8_writes_the_report(tmp_path):
  out = tmp_path / "r.json"
  r = _cli("--config", "configs/cg_table3.py", "--target", "cpu8", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
           "--noflops", "--json", str(out))
  assert r.returncode == 0, r.stderr[-2000:]
  rep = json.loads(out.read_text())
  assert rep["devices"] == 8 and rep["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert rep["train"]["memory"]["temp"] > 0 and rep["train"]["peak_bytes"] > rep["state_bytes"]["params"]
  assert rep["train"]["hlo"]["collectives"]["all-gather"]["count"] > 0  # FSDP gathers its weights
  assert rep["eval"]["peak_bytes"] > 0
  assert rep["flops"]["model_flops"] > 0
  assert "per-device memory:" in r.stdout and "collectives" in r.stdout


# ---------------------------------------------------------------------------------------------------------
# FLOPs: the layer scans' bodies are counted once by XLA; the depth extrapolation restores them exactly.
# ---------------------------------------------------------------------------------------------------------
def test_scan_accounted_flops_equal_the_fully_unrolled_program():
  import jax
  from medcg.model import layers as L
  c = cg_table3.get_config(None)
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.model.llm.num_layers, c.model.vision.num_hidden_layers = 4, 4  # 4 LLM layers, 3 vision layers run
  devices = jax.devices()[:8]
  built = step_compile.build(c, devices)
  scanned = step_compile.cost_flops(step_compile.compile_train(built).compiled)
  with L.unrolled_scans():
    unrolled = step_compile.cost_flops(step_compile.compile_train(step_compile.build(c, devices)).compiled)
  hw = step_compile.hardware_flops(c, devices, scanned)
  assert scanned < 0.8 * unrolled  # the raw figure misses the repeated layers
  assert hw["hardware_flops"] == pytest.approx(unrolled * 8, rel=1e-3)
  assert hw["per_llm_layer"] > hw["per_vision_layer"] > 0
  step_compile.set_remat(c, "full")  # recompute shows up as hardware FLOPs, never in model_flops
  hw_remat = step_compile.hardware_flops(c, devices, scanned)
  assert hw_remat["hardware_flops"] > 1.1 * hw["hardware_flops"]


# ---------------------------------------------------------------------------------------------------------
# Real TPU compiles at a CI-sized shape: the 7B widths with 2 layers on v5e-8.
# ---------------------------------------------------------------------------------------------------------
@needs_libtpu
def test_tpu_compile_of_the_7b_width_fits_with_fsdp_collectives():
  rep = step_compile.run(_seven_b_width(remat="full", data=1, fsdp=-1), "v5e-8", with_eval=False, with_flops=False)
  train = rep["train"]
  assert train["fits"] is True and 0 < train["peak_bytes"] < rep["usable_bytes"]
  assert rep["device_kind"].startswith("TPU v5")
  coll = train["hlo"]["collectives"]
  assert coll["all-gather"]["in_loop_count"] > 0 and coll["reduce-scatter"]["in_loop_count"] > 0
  assert coll.get("collective-permute", {}).get("in_loop_count", 0) == 0


@pytest.mark.slow  # 4 compiles of the 7B widths, ~3 min on 2 cores; CI covers the accounting on cpu8 above
@needs_libtpu
def test_tpu_flops_of_the_7b_width_match_model_flops_within_5_percent():
  rep = step_compile.run(_seven_b_width(remat="none", data=1, fsdp=-1), "v5e-8", with_eval=False, with_flops=True)
  flops = rep["flops"]
  # The raw cost analysis counts each layer scan's body once; accounted for, it matches model_flops.
  assert flops["scan_counted_once"] < flops["hardware_flops"]
  assert abs(flops["hardware_over_model"] - 1) < 0.05, flops


def test_compile_tool_takes_the_qwen_family():
  """The Qwen2-VL family through the same build / compile / FLOPs accounting (cpu8: no libtpu needed)."""
  import jax
  from medcg.model import layers as L
  c = cg_table3.get_config("model=tiny-qwen2vl")
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.model.llm.num_layers, c.model.vision.num_layers = 3, 3
  devices = jax.devices()[:8]
  compiled = step_compile.compile_train(step_compile.build(c, devices)).compiled
  scanned = step_compile.cost_flops(compiled)
  with L.unrolled_scans():
    unrolled = step_compile.cost_flops(step_compile.compile_train(step_compile.build(c, devices)).compiled)
  hw = step_compile.hardware_flops(c, devices, scanned)
  assert hw["hardware_flops"] == pytest.approx(unrolled * 8, rel=1e-3)
  assert hw["per_llm_layer"] > 0 and hw["per_vision_layer"] > 0
  assert "all-gather" in compiled.as_text()  # FSDP gathers the Qwen towers' weights too
