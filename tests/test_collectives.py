"""Collectives of the compiled train step: the HLO audit (medcg.aot.hlo) and the pattern each mesh preset gives.

FSDP must compile to per-layer all-gathers of the weights (forward, and again in the rematerialised backward)
and reduce-scatters of their gradients inside the layer scan, with no collective-permute there; FSDP + tensor
parallel adds Megatron's all-reduces of activations over `tensor`; pure data parallel only all-reduces
gradients. XLA:CPU has no reduce-scatter (it all-reduces and slices) and no windowed einsum, so the CPU tests
check what is true there and the TPU-topology test (libtpu's real compiler, deviceless) the full pattern.
"""
import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from medcg import compile_cache
from medcg.aot import hlo

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install \"jax[tpu]\")")

# ---------------------------------------------------------------------------------------------------------
# The parser on hand-written HLO: a GPU-style module (async pairs, a wrapped reduce-scatter, a scan loop whose
# trip count only its condition states) and a TPU-style one (all-reduce-scatter fusion, one all-gather copied
# into start / done computations under one channel_id, a windowed-einsum loop inside the layer loop).
# ---------------------------------------------------------------------------------------------------------
GPU_STYLE = """HloModule jit_f, entry_computation_layout={(f32[8,16]{1,0})->f32[8,16]{1,0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%wrapped_reduce_scatter (p: f32[64,16]) -> f32[8,16] {
  %p = f32[64,16]{1,0} parameter(0)
  ROOT %rs = f32[8,16]{1,0} reduce-scatter(%p), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
}

%body (t: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %t = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%t), index=1
  %ag-start = (f32[8,16]{1,0}, f32[64,16]{1,0}) all-gather-start(%x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, metadata={op_name="jit(f)/while/body/dot_general"}
  %ag-done = f32[64,16]{1,0} all-gather-done(%ag-start)
  %rs-start = ((f32[64,16]{1,0}), f32[8,16]{1,0}) async-start(%ag-done), calls=%wrapped_reduce_scatter
  %rs-done = f32[8,16]{1,0} async-done(%rs-start)
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[8,16]{1,0}) tuple(%next, %rs-done)
}

%cond (t.1: (s32[], f32[8,16])) -> pred[] {
  %t.1 = (s32[], f32[8,16]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%t.1), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (x.0: f32[8,16]) -> f32[8,16] {
  %x.0 = f32[8,16]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%zero, %x.0)
  %loop = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body, metadata={op_name="jit(f)/while"}
  %y = f32[8,16]{1,0} get-tuple-element(%loop), index=1
  %ar = (f32[8,16]{1,0}, bf16[4]{0}) all-reduce(%y, %y), channel_id=4, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %cp = f32[8,16]{1,0} collective-permute(%y), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %cc = f32[8,16]{1,0} custom-call(%y), custom_call_target="__gpu$xla.gpu.triton"
  ROOT %cc2 = f32[8,16]{1,0} custom-call(%cc), custom_call_target="__gpu$xla.gpu.triton"
}
"""

TPU_STYLE = """HloModule jit_step, is_scheduled=true

%add.1 (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%all-reduce-scatter.3.clone (input: f32[1024,64]) -> f32[128,64] {
  %input = f32[1024,64]{1,0:T(8,128)} parameter(0)
  %all-reduce.1 = f32[1024,64]{1,0:T(8,128)} all-reduce(%input), channel_id=6, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add.1
  %pid = u32[] partition-id()
  %c128 = u32[] constant(128)
  %off = u32[]{:T(128)} multiply(%pid, %c128)
  %c0 = u32[] constant(0)
  ROOT %ds = f32[128,64]{1,0:T(8,128)S(1)} dynamic-slice(%all-reduce.1, %off, %c0), dynamic_slice_sizes={128,64}
}

%start_computation (p0: bf16[16,64]) -> (bf16[16,64], bf16[128,64], u32[]) {
  %p0 = bf16[16,64]{1,0:T(8,128)(2,1)} parameter(0)
  %all-gather.1 = bf16[128,64]{1,0:T(8,128)(2,1)} all-gather(%p0), channel_id=8, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, dimensions={0}, use_global_device_ids=true
  ROOT %custom-call.1 = (bf16[16,64]{1,0}, bf16[128,64]{1,0}, u32[]{:S(2)}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%done_computation (p1: bf16[16,64], p2: bf16[128,64]) -> bf16[128,64] {
  %p1 = bf16[16,64]{1,0} parameter(0)
  %p2 = bf16[128,64]{1,0} parameter(1)
  %all-gather.2 = bf16[128,64]{1,0} all-gather(%p1), channel_id=8, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, dimensions={0}, use_global_device_ids=true
  ROOT %custom-call.2 = bf16[128,64]{1,0} custom-call(%p1, %p2, %all-gather.2), custom_call_target="AsyncCollectiveDone"
}

%wide.windowed_dot_general_body (w: (s32[], bf16[16,64])) -> (s32[], bf16[16,64]) {
  %w = (s32[], bf16[16,64]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%w), index=0
  %shard = bf16[16,64]{1,0} get-tuple-element(%w), index=1
  %collective-permute.1 = bf16[16,64]{1,0} collective-permute(%shard), channel_id=9, source_target_pairs={{0,1},{1,2},{2,3},{3,4},{4,5},{5,6},{6,7},{7,0}}, metadata={op_name="jit(step)/while/body/dot_general"}
  %one.w = s32[] constant(1)
  %j.next = s32[] add(%j, %one.w)
  ROOT %w.out = (s32[], bf16[16,64]{1,0}) tuple(%j.next, %collective-permute.1)
}

%wide.windowed_dot_general_cond (wc: (s32[], bf16[16,64])) -> pred[] {
  %wc = (s32[], bf16[16,64]{1,0}) parameter(0)
  %j.c = s32[] get-tuple-element(%wc), index=0
  %four = s32[] constant(4)
  ROOT %lt.w = pred[] compare(%j.c, %four), direction=LT
}

%layer_body (l: (s32[], bf16[16,64], f32[1024,64])) -> (s32[], bf16[16,64], f32[1024,64]) {
  %l = (s32[], bf16[16,64]{1,0}, f32[1024,64]{1,0}) parameter(0)
  %k = s32[] get-tuple-element(%l), index=0
  %h = bf16[16,64]{1,0} get-tuple-element(%l), index=1
  %g = f32[1024,64]{1,0} get-tuple-element(%l), index=2
  %start = (bf16[16,64]{1,0}, bf16[128,64]{1,0}, u32[]) fusion(%h), kind=kCustom, calls=%start_computation
  %s0 = bf16[16,64]{1,0} get-tuple-element(%start), index=0
  %s1 = bf16[128,64]{1,0} get-tuple-element(%start), index=1
  %done = bf16[128,64]{1,0} fusion(%s0, %s1), kind=kCustom, calls=%done_computation
  %grad = f32[128,64]{1,0:T(8,128)S(1)} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.3.clone, backend_config={"collective_algorithm_config":{"emitter":"SingleInputAllReduceScatterFusion"}}
  %overhang = f32[16,64]{1,0} slice(%grad), slice={[112:128], [0:64]}
  %collective-permute-start.7 = (f32[16,64]{1,0}, f32[16,64]{1,0}, u32[], u32[]) collective-permute-start(%overhang), channel_id=1, source_target_pairs={{0,1},{1,2},{2,3},{3,4},{4,5},{5,6},{6,7}}
  %collective-permute-done.7 = f32[16,64]{1,0} collective-permute-done(%collective-permute-start.7)
  %zero.w = s32[] constant(0)
  %winit = (s32[], bf16[16,64]{1,0}) tuple(%zero.w, %h)
  %windowed = (s32[], bf16[16,64]{1,0}) while(%winit), condition=%wide.windowed_dot_general_cond, body=%wide.windowed_dot_general_body, metadata={op_name="jit(step)/while/body/dot_general"}
  %h2 = bf16[16,64]{1,0} get-tuple-element(%windowed), index=1
  %one.l = s32[] constant(1)
  %k.next = s32[] add(%k, %one.l)
  ROOT %l.out = (s32[], bf16[16,64]{1,0}, f32[1024,64]{1,0}) tuple(%k.next, %h2, %g)
}

%layer_cond (lc: (s32[], bf16[16,64], f32[1024,64])) -> pred[] {
  %lc = (s32[], bf16[16,64]{1,0}, f32[1024,64]{1,0}) parameter(0)
  %k.c = s32[] get-tuple-element(%lc), index=0
  %three = s32[] constant(3)
  ROOT %lt.l = pred[] compare(%k.c, %three), direction=LT
}

ENTRY %main.5_spmd (h0: bf16[16,64], g0: f32[1024,64]) -> bf16[16,64] {
  %h0 = bf16[16,64]{1,0} parameter(0)
  %g0 = f32[1024,64]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %linit = (s32[], bf16[16,64]{1,0}, f32[1024,64]{1,0}) tuple(%zero, %h0, %g0)
  %layers = (s32[], bf16[16,64]{1,0}, f32[1024,64]{1,0}) while(%linit), condition=%layer_cond, body=%layer_body, metadata={op_name="jit(step)/while"}, backend_config={"known_trip_count":{"n":"3"}}
  %alloc = f32[4,8]{1,0} custom-call(), custom_call_target="AllocateBuffer"
  %collective-permute.2 = bf16[16,64]{1,0} collective-permute(%h0), channel_id=1, source_target_pairs={{0,1},{1,0}}
  ROOT %h.out = bf16[16,64]{1,0} get-tuple-element(%layers), index=1
}
"""


def _by_kind(report, kind):
  return [c for c in report["items"] if c["kind"] == kind]


def test_shape_bytes_handles_tuples_layouts_and_bounds():
  assert hlo.shape_bytes("f32[8,16]{1,0}") == 512
  assert hlo.shape_bytes("bf16[2,3]{1,0:T(8,128)(2,1)S(1)}") == 12
  assert hlo.shape_bytes("(f32[4]{0}, (s32[], pred[3]), token[])") == 16 + 4 + 3
  assert hlo.shape_bytes("f32[<=10,2]") == 80
  assert hlo.shape_bytes("f8e4m3fn[16]") == 16
  assert hlo.shape_bytes("f32[]") == 4


@pytest.mark.parametrize("sigils", [True, False], ids=["with_percent", "without_percent"])
def test_gpu_style_async_pairs_wrapped_reduce_scatter_and_condition_trip_count(sigils):
  r = hlo.audit(GPU_STYLE if sigils else GPU_STYLE.replace("%", ""))  # newer printers drop the % sigils
  c = r["collectives"]
  assert hlo.counts(r) == {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 1, "collective-permute": 1}
  # The all-gather-start/-done pair is one collective with the bytes -done returns (the gathered array).
  assert c["all-gather"]["bytes"] == 64 * 16 * 4
  assert c["all-gather"]["in_loop_count"] == 1
  # async-start calls the wrapped reduce-scatter from the loop body: in the loop, 5 trips (from `i < 5`).
  (rs,) = _by_kind(r, "reduce-scatter")
  assert rs["in_loop"] and rs["executions"] == 5 and rs["bytes"] == 8 * 16 * 4 and rs["group_size"] == 8
  assert c["reduce-scatter"]["executed_bytes"] == 5 * 512
  (ag,) = _by_kind(r, "all-gather")
  assert ag["group_size"] == 8 and ag["op_name"] == "jit(f)/while/body/dot_general"
  # Top level: a tuple all-reduce (bytes of both results) over pairs, and a permute.
  (ar,) = _by_kind(r, "all-reduce")
  assert not ar["in_loop"] and ar["bytes"] == 512 + 8 and ar["group_size"] == 2
  assert c["collective-permute"]["in_loop_count"] == 0
  assert r["custom_calls"] == {"__gpu$xla.gpu.triton": 2}
  assert r["loops"][0]["trip_count"] == 5 and r["loops"][0]["from_jax"]


def test_tpu_style_reduce_scatter_fusion_channel_dedupe_and_windowed_loops():
  r = hlo.audit(TPU_STYLE)
  c = r["collectives"]
  # The all-reduce inside an all-reduce-scatter fusion is the reduce-scatter (bytes of its sharded result);
  # the all-gather copied into the start and done computations under channel 8 counts once.
  assert hlo.counts(r) == {"all-gather": 1, "reduce-scatter": 1, "collective-permute": 2}
  assert c["reduce-scatter"]["bytes"] == 128 * 64 * 4 and c["reduce-scatter"]["in_loop_count"] == 1
  assert c["all-gather"]["bytes"] == 128 * 64 * 2 and c["all-gather"]["in_loop_count"] == 1
  (ag,) = _by_kind(r, "all-gather")
  assert ag["group_size"] == 8 and ag["executions"] == 3  # known_trip_count
  # One permute sits in the partitioner's windowed-einsum loop, inside the layer loop: both flags, 3 x 4 runs.
  # Another reuses channel_id 1 at top level (libtpu does): its own collective. The permute of a slice of the
  # reduce-scatter's result is libtpu's realignment of padded shards: part of the reduce-scatter.
  windowed, top = _by_kind(r, "collective-permute")
  assert windowed["in_loop"] and windowed["in_compiler_loop"] and windowed["loops"] == ("layers", "windowed")
  assert windowed["executions"] == 12
  assert not top["in_loop"] and not top["in_compiler_loop"] and top["executions"] == 1
  assert c["collective-permute"]["compiler_loop_count"] == 1
  assert c["reduce-scatter"]["realign_bytes"] == 16 * 64 * 4
  loops = {l["name"]: l for l in r["loops"]}
  assert loops["layers"]["from_jax"] and not loops["windowed"]["from_jax"]
  assert loops["windowed"]["trip_count"] == 4
  assert r["custom_calls"] == {"AllocateBuffer": 1, "AsyncCollectiveDone": 1, "AsyncCollectiveStart": 1}
  table = hlo.format_table(r)
  assert "| reduce-scatter | 1 |" in table and "| AsyncCollectiveStart | 1 |" in table
  assert "all-to-all" not in table  # kinds that do not occur are left out


def test_rejects_text_without_computations():
  with pytest.raises(ValueError, match="no HLO computations"):
    hlo.audit("module {\n  func.func @main() {}\n}")


def test_real_cpu_compile_of_a_scanned_fsdp_matmul():
  """Weights stacked on a layer axis and split over 8 devices: all-gathers inside the compiled loop."""
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  w = jax.ShapeDtypeStruct((3, 64, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp", None)))
  x = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))

  def loss(w, x):
    h, _ = jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)
    return h.sum()

  r = hlo.audit(jax.jit(jax.grad(loss), out_shardings=w.sharding).lower(w, x).compile())
  assert r["collectives"]["all-gather"]["in_loop_count"] >= 1
  assert r["collectives"]["collective-permute"]["count"] == 0
  assert {l["trip_count"] for l in r["loops"]} == {3}
  assert all(c["group_size"] == 8 for c in r["items"])


# ---------------------------------------------------------------------------------------------------------
# The trainer's train step (medcg.train.state: the program medcg.train runs), compiled from abstract shapes.
# ---------------------------------------------------------------------------------------------------------
LLM_DENSE_PER_LAYER = 7  # q, k, v, o, gate, up, down


def compile_train_step(mesh_preset: str, devices, *, remat: str = "full", llm: dict | None = None,
                       seq_len: int | None = None):
  """hlo.audit of the tiny recipe's train step (configs/cg_table3.py, data=synth) on `devices`.

  remat "full" as the pretrained presets train (configs/common.py), so the backward gathers the weights again.
  """
  from configs import cg_table3
  from medcg.aot import step_compile
  from medcg.train import sharding as shd
  from medcg.train import state as state_lib
  from medcg.train import trainer
  c = cg_table3.get_config("data=synth,model=tiny")
  c.mesh.update(shd.MESH_PRESETS[mesh_preset])
  for tower in ("vision", "text", "llm"):
    c.model[tower].remat = remat
  c.model.llm.update(llm or {})
  if seq_len:
    c.data.seq_len = seq_len
  mesh = shd.make_mesh({k: c.mesh[k] for k in shd.MESH_AXES}, devices=list(devices))
  model_cfg = trainer.model_config(c, None)
  parts = trainer.model_parts(c, model_cfg, mesh)
  setup = state_lib.train_setup(c, parts, mesh, 10)
  batch = step_compile.abstract_batch(c, model_cfg, mesh)
  with shd.use_mesh(mesh), compile_cache.not_written():  # TPU executables: not loadable without the chips
    compiled = setup.step.lower(setup.abstract_state, *parts.abstract_sharded[1:], batch).compile()
  return hlo.audit(compiled)


def _in_loop(report, kind):
  return [c for c in report["items"] if c["kind"] == kind and c["in_loop"]]


@pytest.fixture(scope="module")
def cpu_devices():
  devices = jax.devices("cpu")
  if len(devices) < 8:
    pytest.skip("needs 8 CPU devices (tests/conftest.py sets XLA_FLAGS)")
  return devices[:8]


def test_data_parallel_only_all_reduces_gradients(cpu_devices):
  r = compile_train_step("dp", cpu_devices)
  assert set(hlo.counts(r)) == {"all-reduce"}, hlo.format_table(r)


def test_fsdp_gathers_weights_per_layer_and_never_permutes(cpu_devices):
  r = compile_train_step("fsdp", cpu_devices)
  table = hlo.format_table(r)
  assert "collective-permute" not in hlo.counts(r) and "all-to-all" not in hlo.counts(r, in_loop=True), table
  gathers = _in_loop(r, "all-gather")
  # Every LLM weight once in the forward scan and again in the rematerialised backward, over all 8 devices.
  assert len(gathers) >= 2 * LLM_DENSE_PER_LAYER and {c["group_size"] for c in gathers} == {8}, table
  # XLA:CPU has no reduce-scatter: the gradients' reduction (all-reduce + slice) still happens per layer.
  assert _in_loop(r, "reduce-scatter") or _in_loop(r, "all-reduce"), table


def test_fsdp_tp_is_megatron_plus_fsdp_gathers(cpu_devices):
  r = compile_train_step("fsdp_tp", cpu_devices)  # fsdp 4 x tensor 2
  table = hlo.format_table(r)
  assert "collective-permute" not in hlo.counts(r, in_loop=True), table
  gathers = _in_loop(r, "all-gather")
  # Weights are gathered over fsdp only: their tensor-parallel slices stay local.
  assert len(gathers) >= 2 * LLM_DENSE_PER_LAYER and {c["group_size"] for c in gathers} == {4}, table
  # Megatron: the attention output and MLP down projections all-reduce activations over tensor (2) per layer.
  assert len([c for c in _in_loop(r, "all-reduce") if c["group_size"] == 2]) >= 2, table


# A CI-sized model at the medmat sequence length: big enough activations that libtpu's partitioner, left free,
# turned every FSDP matmul into a windowed einsum (80 collective-permutes, 75 in the layer loops, no
# reduce-scatter of weight gradients in them); ~20 s to compile.
TPU_LLM = dict(hidden_size=256, intermediate_size=768, num_heads=4, num_kv_heads=4, head_dim=64)


def tpu_devices():
  from medcg.aot import targets
  return targets.devices(targets.get("v5e-8"))


@needs_libtpu
def test_tpu_fsdp_all_gathers_and_reduce_scatters_inside_the_layer_loop():
  r = compile_train_step("fsdp", tpu_devices(), llm=TPU_LLM, seq_len=1024)
  table = hlo.format_table(r)
  assert not _in_loop(r, "collective-permute") and not _in_loop(r, "all-to-all"), table
  assert not any(row["compiler_loop_count"] for row in r["collectives"].values()), table  # no windowed einsum
  gathers = _in_loop(r, "all-gather")
  assert len(gathers) >= 2 * LLM_DENSE_PER_LAYER and {c["group_size"] for c in gathers} == {8}, table
  assert _in_loop(r, "reduce-scatter"), table  # the weight gradients (XLA may combine them into one)


@pytest.mark.slow
@needs_libtpu
def test_tpu_fsdp_tp_and_dp_patterns():
  r = compile_train_step("fsdp_tp", tpu_devices(), llm=TPU_LLM, seq_len=1024)
  table = hlo.format_table(r)
  assert not _in_loop(r, "collective-permute"), table
  assert not any(row["compiler_loop_count"] for row in r["collectives"].values()), table
  assert {c["group_size"] for c in _in_loop(r, "all-gather")} == {4}, table
  assert _in_loop(r, "reduce-scatter"), table
  assert len([c for c in _in_loop(r, "all-reduce") if c["group_size"] == 2]) >= 2, table
  r = compile_train_step("dp", tpu_devices(), llm=TPU_LLM, seq_len=1024)
  assert set(hlo.counts(r)) == {"all-reduce"}, hlo.format_table(r)
