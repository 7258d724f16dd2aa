"""Meshes and logical axis rules: sharding declared as data.

Parameters and activations are named with *logical* axes ("embed", "mlp", "act_batch", ...). One rules table
(MaxText style) maps each logical axis to mesh axes among `data`, `fsdp` and `tensor`; the first rule for a
name wins. A dimension that the chosen mesh axes do not divide is left unsharded on the axes that do not
fit (big_vision's fsdp tactic does the same), so tiny test models work on any mesh.

    mesh = make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    shardings = param_shardings(abstract_state, mesh, RULES)
    with use_mesh(mesh, RULES):          # activations: constrain(x, ("act_batch", "act_len", "act_embed"))
      ...
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

# Models are created unsharded (or abstract) and placed by jit(out_shardings=...): no mesh needed to build one.
nnx.use_eager_sharding(False)

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

# Logical axis -> mesh axes. Parameters: "embed" is FSDP-sharded, the wide dims are tensor-parallel.
# Activations: the batch is split over data and fsdp; heads / mlp / vocab over tensor.
RULES: Rules = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("patch", None),
    ("norm", None),
)

# Presets for config.mesh: pure data parallel, FSDP, FSDP + tensor parallel.
MESH_PRESETS = {
    "dp": {"data": -1, "fsdp": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},
    "fsdp_tp": {"data": 1, "fsdp": -1, "tensor": 2},
}


def mesh_shape(axes: Mapping[str, int], n_devices: int) -> dict[str, int]:
  """Resolve -1 (fill the rest) and check that the axes multiply to the device count."""
  unknown = [a for a in axes if a not in MESH_AXES]
  if unknown:
    raise ValueError(f"config.mesh: unknown mesh axis {unknown[0]!r}; axes are {MESH_AXES}")
  sizes = {a: int(axes.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {fill}")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {sizes}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if n_devices % known:
      raise ValueError(f"config.mesh: {sizes} does not divide the {n_devices} devices")
    sizes[fill[0]] = n_devices // known
  if math.prod(sizes.values()) != n_devices:
    raise ValueError(f"config.mesh: {sizes} needs {math.prod(sizes.values())} devices, have {n_devices}")
  return sizes


def make_mesh(axes: Mapping[str, int] | str, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD propagation + sharding constraints)."""
  if isinstance(axes, str):
    if axes not in MESH_PRESETS:
      raise ValueError(f"config.mesh: unknown preset {axes!r}; presets are {sorted(MESH_PRESETS)}")
    axes = MESH_PRESETS[axes]
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(dict(axes), len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  # jax.make_mesh defaults to Explicit axes since 0.9; the logical-rules style needs Auto.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def mesh_from_config(mesh_cfg) -> jax.sharding.Mesh:
  """The mesh a `config.mesh` section describes; `num_devices` > 0 uses only the first N devices."""
  axes = dict(mesh_cfg.to_dict() if hasattr(mesh_cfg, "to_dict") else mesh_cfg)
  n_devices = int(axes.pop("num_devices", 0) or jax.device_count())
  if n_devices > jax.device_count():
    raise ValueError(f"config.mesh.num_devices={n_devices} but only {jax.device_count()} devices exist")
  return make_mesh(axes, devices=jax.devices()[:n_devices])


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
  table: dict[str, tuple[str, ...]] = {}
  for name, target in rules:
    if name in table:
      continue  # first rule wins
    if target is None:
      table[name] = ()
    elif isinstance(target, str):
      table[name] = (target,)
    else:
      table[name] = tuple(target)
  return table


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None, mesh: jax.sharding.Mesh,
                    rules: Rules = RULES) -> P:
  """PartitionSpec for an array whose dims carry `names`; drops mesh axes that are used or don't divide."""
  table = _rule_table(rules)
  used: set[str] = set()
  out = []
  for d, name in enumerate(names):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
    axes = [a for a in table[name] if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
    if shape is not None:
      while axes and shape[d] % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*out)


def _var_names(var: nnx.Variable, ndim: int) -> tuple[str | None, ...] | None:
  meta = var.get_metadata()
  names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
  if not names:
    return None
  names = tuple(names)
  if len(names) == ndim - 1:  # stacked by a scan whose transform did not record the layer axis
    names = ("layers",) + names
  if len(names) != ndim:
    raise ValueError(f"logical axes {names} do not match an array of rank {ndim}")
  return names


def param_shardings(state: Any, mesh: jax.sharding.Mesh, rules: Rules = RULES) -> Any:
  """NamedShardings for an nnx.State (or a module) from its logical-axis metadata; unnamed arrays replicate."""
  if isinstance(state, nnx.Module):
    state = nnx.state(state)

  def one(x):
    if isinstance(x, nnx.Variable):
      value = x.get_value() if hasattr(x, "get_value") else x.value
      names = _var_names(x, len(value.shape))
      spec = P() if names is None else logical_to_spec(names, value.shape, mesh, rules)
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules = RULES, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dim over the act_batch mesh axes, the rest replicated."""
  spec = logical_to_spec(("act_batch",) + (None,) * (ndim - 1), None, mesh, rules)
  return NamedSharding(mesh, spec)


def data_parallel_size(mesh: jax.sharding.Mesh, rules: Rules = RULES) -> int:
  """How many ways the batch is split (the global batch must be a multiple of this)."""
  axes = _rule_table(rules)["act_batch"]
  return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


# ---------------------------------------------------------------------------------------------------------
# Activation constraints. Models call constrain(x, names); outside use_mesh() it is the identity, so the same
# model code runs unsharded in tests and sharded in the trainer.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Context(threading.local):
  mesh: jax.sharding.Mesh | None = None
  rules: Rules = RULES


_CTX = _Context()


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules: Rules = RULES):
  """Make `mesh` and `rules` current for constrain() (and jax.set_mesh for everything else)."""
  old = (_CTX.mesh, _CTX.rules)
  _CTX.mesh, _CTX.rules = mesh, rules
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _CTX.mesh, _CTX.rules = old


@contextlib.contextmanager
def no_mesh():
  """No mesh current (neither ours nor jax.set_mesh's), e.g. to build a model abstractly from inside a trainer's
  use_mesh(): under a jax mesh, nnx.eval_shape would read the logical axis names as mesh axes."""
  old = (_CTX.mesh, _CTX.rules)
  _CTX.mesh = None
  try:
    with jax.set_mesh(None):
      yield
  finally:
    _CTX.mesh, _CTX.rules = old


def current_mesh() -> jax.sharding.Mesh | None:
  """The mesh of the enclosing use_mesh(), or None."""
  return _CTX.mesh


def constrain(x: jax.Array, names: Iterable[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names, when a mesh is current; else x unchanged."""
  if _CTX.mesh is None:
    return x
  spec = logical_to_spec(tuple(names), x.shape, _CTX.mesh, _CTX.rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(_CTX.mesh, spec))


def batch_axes(rules: Rules = RULES) -> tuple[str, ...]:
  """The mesh axes the batch is split over (the act_batch rule): data parallel and FSDP."""
  return _rule_table(rules).get("act_batch", ())


def weight_spec(names: Sequence[str | None], shape: Sequence[int] | None, mesh: jax.sharding.Mesh,
                rules: Rules = RULES) -> P:
  """The layout a weight is *used* in: its param spec without the mesh axes that split the batch.

  FSDP stores a weight split over `fsdp`, which also splits the batch; a matmul cannot use both splits, so the
  weight must be gathered over those axes where it is used, and its gradient reduce-scattered back. Tensor
  parallel axes (not batch axes) stay: the matmul runs on the local slice (Megatron).
  """
  drop = set(batch_axes(rules))
  out = []
  for entry in logical_to_spec(names, shape, mesh, rules):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept = tuple(a for a in axes if a not in drop)
    out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return P(*out)


def constrain_weight(w: jax.Array, names: Iterable[str | None]) -> jax.Array:
  """`w` (a param's value, logical axes `names`) in its compute layout (`weight_spec`) when a mesh is current.

  Without it the partitioner is free to keep the weight split on its contracting dim at the matmul, and on TPU
  it then emits a windowed einsum: a loop of collective-permutes per matmul, forward and backward, instead of
  FSDP's one all-gather of the weight and one reduce-scatter of its gradient per layer. The gradient's transpose
  of this constraint sums it in the compute layout; the param's own (stored) sharding then keeps each device's
  slice, which XLA fuses into a reduce-scatter (libtpu on a 2D torus such as v5e-16 keeps all-reduce + slice,
  even for an explicit psum_scatter). Asking for the stored layout straight from the matmul instead brings the
  windowed einsum back. Callers apply this after the cast to the compute dtype (the gather then moves bf16).
  Partitioning only: the values are the same.
  """
  if _CTX.mesh is None:
    return w
  names = tuple(names)
  spec = weight_spec(names, w.shape, _CTX.mesh, _CTX.rules)
  if spec == logical_to_spec(names, w.shape, _CTX.mesh, _CTX.rules):
    return w  # nothing to gather (data parallel, or dims the FSDP axes do not divide)
  return jax.lax.with_sharding_constraint(w, NamedSharding(_CTX.mesh, spec))


def describe(shardings: Any) -> dict[str, str]:
  """{param path: spec} for logs and tests."""
  out = {}
  for path, s in jax.tree_util.tree_leaves_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
    if isinstance(s, NamedSharding):
      keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
      out["/".join(k for k in keys if not k.startswith("."))] = str(s.spec)
  return out


def global_batch(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh, rules: Rules = RULES) -> dict:
  """Assemble per-host batch slices into global jax.Arrays (host-only object fields are dropped)."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    if v.dtype == object:
      continue
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
  return out
