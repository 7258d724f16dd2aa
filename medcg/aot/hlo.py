"""Collective and custom-call audit of optimized HLO text (`compiled.as_text()`).

Why: whether a sharded program moves the data its rules ask for is only visible after SPMD partitioning. FSDP
should compile to per-layer all-gathers of weights and reduce-scatters of gradients inside the scanned layer
loop; a pile of collective-permutes or all-to-alls there means the partitioner is resharding something the rules
did not ask for. This module reads the text XLA prints after optimization and answers, per collective kind:
how many, how many bytes (the result shape, per device), and how many of them sit inside a loop JAX emitted (the
`lax.scan` over stacked layers) rather than at top level; plus custom calls by target (Pallas `tpu_custom_call`,
Triton, ...). Loops the compiler made itself are told apart: libtpu's SPMD partitioner turns a matmul whose
operands are split the wrong way into a "windowed einsum", a while loop (`windowed_dot_general_body`) of
collective-permutes; those collectives get `in_compiler_loop`.

    report = hlo.audit(jitted.lower(*args).compile().as_text())
    report["collectives"]["all-gather"]["in_loop_count"]
    print(hlo.format_table(report))

Backend forms it folds into one logical collective each:
  * async pairs (`all-gather-start` / `-done`, GPU `async-start` wrapping `reduce-scatter`): the op is counted
    once, with the bytes of what `-done` returns;
  * TPU async collective fusions, where one all-gather appears in the start, continuation and done
    computations: the copies share a `channel_id` and count once;
  * TPU reduce-scatter, which libtpu emits as a fusion computation named `all-reduce-scatter*` holding an
    `all-reduce` + `dynamic-slice`: counted as a reduce-scatter with the bytes of the fusion's (sharded) result.
    For wide arrays libtpu pads the shards and shifts each one's overhang to the next device with a
    collective-permute of a slice of that result; the permute is part of the reduce-scatter (its
    `realign_bytes`), not a collective of its own.

`executions` multiplies by the enclosing loops' trip counts (XLA's `known_trip_count`, else the `i < N` of the
loop condition, else 1), which turns static counts into per-step ones.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Iterable, Mapping

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all",
                    "ragged-all-to-all", "collective-broadcast")

_DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32,
    "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128, "token": 0,
}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([^\]]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\((.*)\)\s+->\s+(.*?)\s*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*)$")
_OPCODE = re.compile(r"([\w\-]+)\(")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation|branch_computations|"
                     r"called_computations|async_wrapped_computation)=(\{[^}]*\}|%?[\w.\-]+)")
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_OP_NAME = re.compile(r'\bop_name="([^"]*)"')
_TARGET = re.compile(r'\bcustom_call_target="([^"]*)"')
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_GROUPS = re.compile(r"\breplica_groups=(mesh\[[^\]]*\][^{]*\{[^}]*\}|\[[^\]]*\]<=\[[^\]]*\](?:T\([\d,]*\))?|"
                     r"\{(?:\{[\d,\s]*\},?\s*)*\}|\{\})")
_RS_COMPUTATION = re.compile(r"^all-reduce-scatter")


def dtype_bytes(dtype: str) -> float:
  """Bytes per element of an HLO primitive type (f8/f4 variants by their bit width)."""
  if dtype in _DTYPE_BITS:
    return _DTYPE_BITS[dtype] / 8
  m = re.match(r"f(\d+)", dtype)  # f8e4m3fn, f8e5m2, f4e2m1fn, ...
  if m:
    return int(m.group(1)) / 8
  raise ValueError(f"unknown HLO element type {dtype!r}")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string; a tuple is the sum of its arrays (layouts and `<=` bounds are ignored)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(re.sub(r"\{[^{}]*\}", "", shape)):
    if dtype not in _DTYPE_BITS and not re.match(r"f\d+e", dtype):
      continue
    sizes = [int(d.replace("<=", "")) for d in dims.split(",") if d.strip()]
    total += dtype_bytes(dtype) * math.prod(sizes)
  return int(total)


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  opcode: str
  shape: str
  attrs: str                    # everything after the operand list
  operands: tuple[str, ...]
  called: tuple[str, ...]       # computations this instruction calls (fusion, while, reduce, async, ...)
  is_root: bool = False
  operand_text: str = ""        # the raw operand list, e.g. "(4)" for a constant

  @property
  def bytes(self) -> int:
    return shape_bytes(self.shape)

  @property
  def channel_id(self) -> int | None:
    m = _CHANNEL.search(self.attrs)
    return int(m.group(1)) if m else None

  @property
  def op_name(self) -> str:
    m = _OP_NAME.search(self.attrs)
    return m.group(1) if m else ""


@dataclasses.dataclass
class Computation:
  name: str
  is_entry: bool
  result_shape: str
  instructions: list[Instruction]


@dataclasses.dataclass
class Module:
  computations: dict[str, Computation]
  entry: str


def _split_top(s: str) -> tuple[str, str]:
  """('(...)' balanced prefix of s, rest)."""
  depth = 0
  for i, ch in enumerate(s):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      return s[:i + 1], s[i + 1:]
  return s, ""


def _parse_instruction(line: str) -> Instruction | None:
  m = _INSTR.match(line)
  if not m:
    return None
  name, rest = m.group(2), m.group(3)
  if rest.startswith("("):
    shape, rest = _split_top(rest)
  else:
    shape, _, rest = rest.partition(" ")
  rest = rest.lstrip()
  om = _OPCODE.match(rest)
  if not om:
    return None
  operands, attrs = _split_top(rest[om.end() - 1:])
  # "(%a, %b)", or without the % sigils, or with operand shapes ("f32[2]{0} %a"): the last token of each.
  bare = re.sub(r"/\*.*?\*/|\[[^\]]*\]|\{[^{}]*\}", "", operands[1:-1])
  names = tuple(p.split()[-1].lstrip("%") for p in bare.split(",") if p.strip())
  called = []
  for _, target in _CALLED.findall(attrs):
    called += [t.strip().lstrip("%") for t in target.strip("{}").split(",") if t.strip()]
  return Instruction(name, om.group(1), shape, attrs, names, tuple(called), bool(m.group(1)), operands)


def parse_module(text: str) -> Module:
  """The computations of an HLO module's text (`HloModule ...` then `[ENTRY] %name (...) -> shape { ... }`)."""
  comps: dict[str, Computation] = {}
  entry = ""
  current: Computation | None = None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current = Computation(m.group(2), bool(m.group(1)), m.group(4), [])
        if current.is_entry:
          entry = current.name
      continue
    if line.strip() == "}":
      comps[current.name] = current
      current = None
      continue
    instr = _parse_instruction(line)
    if instr is not None:
      current.instructions.append(instr)
  if not comps:
    raise ValueError("no HLO computations found: pass the text of compiled.as_text() (or lowered.as_text('hlo'))")
  if not entry:
    entry = next(reversed(comps))
  return Module(comps, entry)


@dataclasses.dataclass(frozen=True)
class Collective:
  """One logical collective of the program (async pieces and TPU fusion copies folded together)."""
  kind: str
  name: str                 # the instruction (the first copy seen)
  computation: str
  bytes: int                # result bytes per device
  in_loop: bool             # inside a loop JAX emitted (lax.scan / while_loop: the scanned layers), at any depth
  in_compiler_loop: bool    # inside a loop XLA made (the SPMD partitioner's windowed einsum), at any depth
  loops: tuple[str, ...]    # the enclosing while instructions, outermost first
  executions: int           # times it runs per call of the program (known trip counts multiplied)
  channel_id: int | None
  group_size: int | None    # devices per replica group, where the format says
  op_name: str              # the jax op that produced it (metadata), for finding the source line
  realign_bytes: int = 0    # reduce-scatter: bytes its libtpu lowering shifts to a neighbour with a permute


@dataclasses.dataclass(frozen=True)
class Loop:
  name: str                 # the while instruction
  computation: str          # where it sits
  body: str
  trip_count: int | None
  from_jax: bool            # emitted by JAX (op_name ".../while"), not made by the compiler (windowed einsum)
  op_name: str


def _group_size(attrs: str) -> int | None:
  m = _GROUPS.search(attrs)
  if not m:
    return None
  g = m.group(1)
  if g.startswith("mesh["):  # mesh['axis_0'=8,'axis_1'=2] {'axis_0'}: the listed axes' sizes
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", g))
    chosen = re.findall(r"'([^']+)'", g.split("]", 1)[1])
    return math.prod(int(sizes[a]) for a in chosen) if all(a in sizes for a in chosen) else None
  if g.startswith("["):      # iota form [groups,size]<=[...]
    dims = [int(d) for d in g[1:g.index("]")].split(",") if d]
    return dims[-1] if dims else None
  first = re.search(r"\{([\d,\s]*)\}", g[1:])
  if not first:
    return None
  return len([x for x in first.group(1).split(",") if x.strip()])


def _trip_count(module: Module, ins: Instruction) -> int | None:
  """A while's trip count: XLA's `known_trip_count`, else `i < N` in its condition (scan's 0-based, step-1
  counter; libtpu drops the backend config)."""
  trip = _TRIP.search(ins.attrs)
  if trip:
    return int(trip.group(1))
  cond = re.search(r"\bcondition=%?([\w.\-]+)", ins.attrs)
  comp = module.computations.get(cond.group(1)) if cond else None
  if comp is None:
    return None
  by_name = {i.name: i for i in comp.instructions}
  root = next((i for i in comp.instructions if i.is_root), None)
  if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs or len(root.operands) != 2:
    return None
  bound = by_name.get(root.operands[1])
  if bound is None or bound.opcode != "constant":
    return None
  m = re.fullmatch(r"\((\d+)\)", bound.operand_text.strip())
  return int(m.group(1)) if m else None


def _loops(module: Module) -> dict[str, Loop]:
  """{while instruction name: Loop} over the whole module."""
  out = {}
  for comp in module.computations.values():
    for ins in comp.instructions:
      if ins.opcode == "while":
        body = re.search(r"\bbody=%?([\w.\-]+)", ins.attrs)
        body_name = body.group(1) if body else ""
        op = ins.op_name
        # The partitioner's loops carry the dot's op_name and a windowed_dot_general body; JAX's end in "while".
        from_jax = (op.endswith("while") if op else "windowed" not in body_name)
        out[ins.name] = Loop(ins.name, comp.name, body_name, _trip_count(module, ins), from_jax, op)
  return out


def _enclosing_loops(module: Module, loops: Mapping[str, Loop]) -> dict[str, tuple[str, ...]]:
  """{computation: the while instructions around it, outermost first}, along the first call path from ENTRY
  (computations XLA shares between call sites sit at the same depth in practice)."""
  out: dict[str, tuple[str, ...]] = {}
  stack = [(module.entry, ())]
  while stack:
    name, around = stack.pop()
    if name in out or name not in module.computations:
      continue
    out[name] = around
    for ins in module.computations[name].instructions:
      inner = around + (ins.name,) if ins.name in loops else around
      stack.extend((c, inner) for c in ins.called)
  for name in module.computations:  # unreachable from ENTRY (should not happen): top level
    out.setdefault(name, ())
  return out


def _executions(module: Module) -> dict[str, int]:
  """Times each computation runs per program call: call-graph paths from ENTRY, x trip count through whiles."""
  callers: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
  for comp in module.computations.values():
    for ins in comp.instructions:
      mult = (_trip_count(module, ins) or 1) if ins.opcode == "while" else 1
      for c in ins.called:
        callers[c].append((comp.name, mult))
  memo: dict[str, int] = {}

  def count(name: str, depth: int = 0) -> int:
    if name == module.entry:
      return 1
    if name in memo:
      return memo[name]
    if depth > 200:  # a malformed (cyclic) graph: stop rather than recurse forever
      return 1
    memo[name] = sum(count(c, depth + 1) * m for c, m in callers.get(name, ()))
    return memo[name]

  return {name: count(name) for name in module.computations}


def _base_kind(opcode: str) -> str | None:
  for kind in COLLECTIVE_KINDS:
    if opcode in (kind, kind + "-start"):
      return kind
  return None


def _realigned_reduce_scatter(comp: Computation, ins: Instruction, by_name: Mapping[str, Instruction],
                              module: Module) -> Instruction | None:
  """The all-reduce inside the all-reduce-scatter fusion whose output this collective-permute shifts, if any.

  libtpu reduce-scatters a wide array (minor dim of ~11k elements) into padded shards (4096 rows as 8 x 528)
  and then sends each shard's overhang to its neighbour: permute(slice(all-reduce-scatter fusion)), concatenated
  on the other side. It does so for an explicit `psum_scatter` too; the permute is part of its reduce-scatter.
  """
  src = by_name.get(ins.operands[0]) if ins.operands else None
  for _ in range(3):  # slice, possibly behind a bitcast / copy
    if src is None or src.opcode not in ("slice", "bitcast", "copy"):
      break
    src = by_name.get(src.operands[0]) if src.operands else None
  if src is None or src.opcode != "fusion" or not src.called or not _RS_COMPUTATION.match(src.called[0]):
    return None
  inner = module.computations.get(src.called[0])
  return next((i for i in inner.instructions if i.opcode in ("all-reduce", "all-reduce-start")), None) if inner else None


def find_collectives(module: Module) -> list[Collective]:
  """Every logical collective in the module, in text order (see the module docstring for what is folded)."""
  loops = _loops(module)
  around = _enclosing_loops(module, loops)
  runs = _executions(module)
  fused = {c for comp in module.computations.values() for i in comp.instructions if i.opcode == "fusion"
           for c in i.called}
  # GPU-style async pairs: the -done's result is the collective's output (a -start returns operand + output).
  done_bytes: dict[str, int] = {}
  for comp in module.computations.values():
    for ins in comp.instructions:
      if ins.opcode.endswith("-done") and ins.operands:
        done_bytes[ins.operands[0]] = ins.bytes
  found: dict[Any, Collective] = {}
  realign: list[tuple[Instruction, int]] = []  # (the reduce-scatter's all-reduce, bytes of the shifting permute)
  for comp in module.computations.values():
    by_name = {i.name: i for i in comp.instructions}
    for ins in comp.instructions:
      kind = _base_kind(ins.opcode)
      if kind is None:
        continue
      nbytes = done_bytes.get(ins.name, ins.bytes) if ins.opcode.endswith("-start") else ins.bytes
      if kind == "collective-permute":
        rs = _realigned_reduce_scatter(comp, ins, by_name, module)
        if rs is not None:
          realign.append((rs, nbytes))
          continue
      if kind == "all-reduce" and _RS_COMPUTATION.match(comp.name):
        kind, nbytes = "reduce-scatter", shape_bytes(comp.result_shape)
      # Copies of one async collective in libtpu's start / continuation / done fusions share a channel_id;
      # ops outside fusions are each their own (libtpu reuses a channel_id across separate permutes).
      fused_copy = comp.name in fused and ins.channel_id is not None
      key = (kind, ins.channel_id) if fused_copy else (kind, comp.name, ins.name)
      if key in found:
        continue
      enclosing = around[comp.name]
      found[key] = Collective(
          kind, ins.name, comp.name, nbytes, in_loop=any(loops[w].from_jax for w in enclosing),
          in_compiler_loop=any(not loops[w].from_jax for w in enclosing), loops=enclosing,
          executions=max(runs.get(comp.name, 1), 1), channel_id=ins.channel_id, group_size=_group_size(ins.attrs),
          op_name=ins.op_name)
  for rs, nbytes in realign:
    key = ("reduce-scatter", rs.channel_id)
    if key in found:
      found[key] = dataclasses.replace(found[key], realign_bytes=found[key].realign_bytes + nbytes)
  return list(found.values())


def custom_calls(module: Module) -> dict[str, int]:
  """{custom_call_target: count} over every computation (TPU runtime targets included)."""
  counts: collections.Counter[str] = collections.Counter()
  for comp in module.computations.values():
    for ins in comp.instructions:
      if ins.opcode == "custom-call":
        m = _TARGET.search(ins.attrs)
        counts[m.group(1) if m else "?"] += 1
  return dict(sorted(counts.items()))


def _as_text(hlo: Any) -> str:
  if isinstance(hlo, str):
    return hlo
  if hasattr(hlo, "as_text"):  # a jax Compiled (or Lowered: its StableHLO has no collectives yet)
    return hlo.as_text()
  raise TypeError(f"expected HLO text or a compiled jax executable, got {type(hlo).__name__}")


_ROW = ("count", "bytes", "in_loop_count", "in_loop_bytes", "compiler_loop_count", "executions", "executed_bytes",
        "realign_bytes")


def summarize(collectives: Iterable[Collective]) -> dict[str, dict[str, int]]:
  """{kind: {count, bytes, in_loop_count, in_loop_bytes, compiler_loop_count, executions, executed_bytes,
  realign_bytes}}.

  Every kind of COLLECTIVE_KINDS is present (zeros where absent). `in_loop_*`: inside a JAX loop (the layer
  scans); `compiler_loop_count`: inside a loop the partitioner made (windowed einsum), wherever it sits.
  """
  out = {k: dict.fromkeys(_ROW, 0) for k in COLLECTIVE_KINDS}
  for c in collectives:
    row = out.setdefault(c.kind, dict.fromkeys(_ROW, 0))
    row["count"] += 1
    row["bytes"] += c.bytes
    row["executions"] += c.executions
    row["executed_bytes"] += c.executions * c.bytes
    row["compiler_loop_count"] += c.in_compiler_loop
    row["realign_bytes"] += c.realign_bytes
    if c.in_loop:
      row["in_loop_count"] += 1
      row["in_loop_bytes"] += c.bytes
  return out


def audit(hlo: Any) -> dict[str, Any]:
  """The audit of optimized HLO (text, or a jax Compiled): collectives by kind, custom calls, loops.

  Returns {"collectives": {kind: summarize's row}},
  "custom_calls": {target: count}, "loops": [Loop as a dict], "items": [Collective as a dict]}: plain data,
  JSON-ready (medcg.compile writes it into its report).
  `count` / `bytes` are static (each op once); `executions` / `executed_bytes` are per program call.
  """
  module = parse_module(_as_text(hlo))
  items = find_collectives(module)
  loops = list(_loops(module).values())
  return {
      "collectives": summarize(items),
      "custom_calls": custom_calls(module),
      "loops": [dataclasses.asdict(l) for l in loops],
      "items": [dataclasses.asdict(c) for c in items],
  }


def counts(report: Mapping[str, Any], *, in_loop: bool | None = None) -> dict[str, int]:
  """{kind: count} of the kinds present (all, only inside loops, or only at top level)."""
  out = {}
  for kind, row in report["collectives"].items():
    n = row["count"] if in_loop is None else row["in_loop_count"] if in_loop else row["count"] - row["in_loop_count"]
    if n:
      out[kind] = n
  return out


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def format_table(report: Mapping[str, Any], *, custom: bool = True) -> str:
  """A markdown table of the collectives (kinds present) and, with `custom`, the custom-call targets."""
  lines = ["| collective | count | bytes | in loop | in-loop bytes | in compiler loops | per step | bytes per step |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for kind, r in report["collectives"].items():
    if r["count"]:
      lines.append(f"| {kind} | {r['count']} | {_fmt_bytes(r['bytes'])} | {r['in_loop_count']} | "
                   f"{_fmt_bytes(r['in_loop_bytes'])} | {r.get('compiler_loop_count', 0)} | {r['executions']} | "
                   f"{_fmt_bytes(r['executed_bytes'])} |")
  if len(lines) == 2:
    lines.append("| (none) | 0 | 0 B | 0 | 0 B | 0 | 0 | 0 B |")
  if custom and report.get("custom_calls"):
    lines += ["", "| custom call | count |", "|---|---:|"]
    lines += [f"| {t} | {n} |" for t, n in report["custom_calls"].items()]
  return "\n".join(lines)


__all__ = ["COLLECTIVE_KINDS", "Collective", "Loop", "Module", "audit", "counts", "custom_calls",
           "find_collectives", "format_table", "parse_module", "shape_bytes", "summarize"]
