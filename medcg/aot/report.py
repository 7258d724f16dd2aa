"""Text tables of a `medcg.compile` report (the JSON is the report itself; this is how a person reads it)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

GiB = 1024 ** 3


def gib(n) -> str:
  """Bytes for a person: GiB from 1 GiB up, MiB below."""
  if n is None:
    return "-"
  return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2 ** 20:.1f} MiB"


def jsonable(obj: Any) -> Any:
  if isinstance(obj, Mapping):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (np.floating,)):
    return float(obj)
  return obj


def verdict(train: Mapping[str, Any], usable: int | None) -> str:
  fits = train.get("fits")
  if fits is None:
    return "no memory limit on this target (cpu): sizes only"
  if fits:
    head = train.get("headroom_bytes")
    return f"FITS: peak {gib(train['peak_bytes'])} of {gib(usable)} usable, headroom {gib(head)}" + (
        f" ({head / usable:.0%})" if usable else "")
  needed = train.get("needed_bytes") or train.get("peak_bytes")
  available = train.get("available_bytes") or usable
  short = f", short by {gib(needed - available)}" if needed and available else ""
  return f"DOES NOT FIT: needs {gib(needed)} per device, {gib(available)} available{short}"


def memory_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
  s = report["state_bytes"]
  rows = [("trainable params", gib(s["params"])), ("optimizer state", gib(s["optimizer"])),
          ("frozen params", gib(s["frozen_params"])), ("other state", gib(s["other_state"])),
          ("batch", gib(s["batch"]))]
  mem = report["train"].get("memory")
  if mem:
    rows += [("arguments (compiler)", gib(mem["argument"])), ("outputs not donated", gib(mem["output"] - mem["alias"])),
             ("XLA temporaries", gib(mem["temp"])), ("program", gib(mem["generated_code"])),
             ("peak", gib(mem["peak"]))]
  rows += [("device memory (spec)", gib(report["hbm_bytes"] or None)),
           ("usable", gib(report["usable_bytes"] or None))]
  return rows


def _collective_lines(audit: Mapping[str, Any]) -> list[str]:
  lines = []
  for kind, c in sorted(audit.get("collectives", {}).items()):
    if not c.get("count"):
      continue
    lines.append(f"  {kind:<20} {c['count']:>5}  {gib(c.get('bytes', 0)):>12}   in layer loops: "
                 f"{c.get('in_loop_count', 0):>4}")
  calls = audit.get("custom_calls", {})
  if calls:
    lines.append("  custom calls: " + ", ".join(f"{k} x{v}" for k, v in sorted(calls.items())))
  return lines or ["  none"]


def format_text(report: Mapping[str, Any]) -> str:
  """The memory table, verdict, FLOPs, collectives and (for --search) the tried candidates."""
  if "train" not in report:  # a search that found nothing
    return _search_lines(report.get("search", {}))
  out = [f"medcg.compile: {report['target']} ({report['devices']} x {report['device_kind']}), mesh {report['mesh']}, "
         f"{report['model']}, remat {report['remat']}, global batch {report['global_batch']} "
         f"(per device {report['per_device_batch']}, accum {report['accum_steps']}), seq {report['seq_len']}, "
         f"TRIM {'on (' + str(report['trim_impl']) + ')' if report['trim'] else 'off'}",
         "  versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
         *[f"  note: {n}" for n in report.get("notes", [])],
         *(["  launch environment: " + " ".join(f"{k}={v}" for k, v in report["env"].items())]
           if report.get("env") else []),
         f"train step: compiled in {report['train']['compile_s']:.1f} s" if report["train"].get("memory") else
         (f"train step: compiler ran out of memory after {report['train']['compile_s']:.1f} s: "
          if report["train"]["compile_s"] else "train step: ") + report["train"].get("error", ""),
         "  per-device memory:"]
  out += [f"    {k:<24} {v:>12}" for k, v in memory_rows(report)]
  out.append("  " + verdict(report["train"], report["usable_bytes"]))
  for k in report["train"].get("knobs", []):
    out.append(f"    knob: {k}")
  flops = report.get("flops")
  if flops:
    out.append(f"  FLOPs per step: model_flops {flops['model_flops']:.3e}")
    if flops.get("hardware_flops"):
      out.append(f"    compiler (layer scans accounted): {flops['hardware_flops']:.3e} = "
                 f"{flops['hardware_over_model']:.3f} x model_flops (above 1: remat recompute, softmax, norms)")
      out.append(f"    compiler, scan bodies counted once (raw cost analysis): {flops['scan_counted_once']:.3e}")
    elif flops.get("compiler_flops_scan_once") is None:
      out.append("    compiler: no cost analysis on this backend")
  if report["train"].get("hlo"):
    out.append("  collectives (optimised HLO, per device):")
    out += ["  " + line for line in _collective_lines(report["train"]["hlo"])]
  ev = report.get("eval")
  if ev:
    if ev.get("memory"):
      out.append(f"eval step (multiple-choice scoring): compiled in {ev['compile_s']:.1f} s, peak "
                 f"{gib(ev['peak_bytes'])}" + ("" if ev.get("fits") is None else
                                                ", fits" if ev["fits"] else ", DOES NOT FIT"))
    else:
      out.append(f"eval step: DOES NOT FIT: {ev.get('error', '')}")
  meas = report.get("measured")
  if meas:
    out.append(f"measured on this host: peak {gib(meas.get('peak_bytes_in_use'))} vs compiler {gib(meas.get('predicted_peak_bytes'))}"
               f" (ratio {meas.get('measured_over_predicted', float('nan')):.3f}), step {meas.get('step_s', 0) * 1e3:.1f} ms")
  if report.get("search"):
    out += _search_lines(report["search"]).splitlines()
  return "\n".join(out)


def _search_lines(search: Mapping[str, Any]) -> str:
  lines = [f"search ({search.get('criterion', '')}):"]
  for row in search.get("tried", []):
    lines.append(f"  remat={row['remat']:<34} accum={row['accum_steps']:<3} mesh={row['mesh']}  peak "
                 f"{gib(row.get('peak_bytes'))}  {'FITS (best)' if row['fits'] else 'no'}")
  if not search.get("best_candidate"):
    lines.append("  nothing fits: a larger target is needed")
  return "\n".join(lines)
