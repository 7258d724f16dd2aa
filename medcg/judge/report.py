"""Judge run outputs: per-sample JSONL, results.json and a markdown leaderboard, written atomically (local or gs://)."""
from __future__ import annotations

import json
from typing import Any

from medcg import fileio
from medcg.judge import prompts
from medcg.judge.runner import RunOutput


atomic_write = fileio.atomic_write_text


def results_dict(out: RunOutput, judge_identity: str, judge_decoding: dict, config: Any = None,
                 models: dict | None = None, reference: str | None = None, run: dict | None = None) -> dict:
  """The results.json content. `models`: per model, its answer file and decoding settings; `run`: when,
  which commit, which package versions."""
  return {
      "template_version": prompts.TEMPLATE_VERSION,
      "judge": {"identity": judge_identity, "decoding": judge_decoding},
      "reference": reference,
      "models": models or {},
      "warnings": out.warnings,
      "stats": out.stats,
      "leaderboard": out.metrics,
      "elo": out.elo,
      "incomplete": [{"sample_id": r["sample_id"], "model": r["model"], "opponent": r["opponent"],
                      "errors": [o["error"] for o in r["orders"] if o["error"]]}
                     for r in out.records if r["verdict"] is None],
      "skipped": [{"sample_id": s.sample_id, "model": s.model, "reason": s.reason} for s in out.skipped],
      "config": config,
      "run": run or {},
  }


def _pct(x) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}"


def leaderboard_markdown(out: RunOutput) -> str:
  """A leaderboard: overall W/T/L, win rate and consistency per pair, Elo, per-level W/T/L, skips."""
  metrics = sorted(out.metrics, key=lambda m: -(m["win_rate"] or 0.0))
  lines = ["# Judge leaderboard", "",
           f"Prompt template `{prompts.TEMPLATE_VERSION}`. Win rate = wins / judged samples (ties count 0); "
           "tie = tie + every 'unable to decide' bucket; consistency = same vote in both orders.", "",
           "| rank | model | vs | win | tie | lose | win rate % | consistency % | judged | incomplete |",
           "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  if out.warnings:  # before the table: a judge that mostly failed to vote makes it unreliable
    lines[2:2] = [line for w in out.warnings for line in (f"**Warning:** {w}", "")]
  for i, m in enumerate(metrics, 1):
    lines.append(f"| {i} | {m['model']} | {m['opponent']} | {m['win']} | {m['tie']} | {m['lose']} | "
                 f"{_pct(m['win_rate'])} | {_pct(m['position_consistency'])} | {m['n_judged']} | "
                 f"{m['n_incomplete']} |")
  s = out.stats
  lines += ["", f"Judge calls: {s['calls']} ({s['cached']} from cache, {s['sent']} sent); "
            f"unparsed replies: {s['unparsed']} of {s['replies']} "
            f"({_pct(s['parse_failure_rate'])} %); failed calls: {s['failed_calls']}.",
            "", f"Label policy `{s['label_policy']}`: {s['multi_label_replies']} replies had several label "
            f"lines, {s['conflicting_label_replies']} of them with different labels."]
  if out.elo:
    lines += ["", "## Elo (bootstrap median, 95 % interval)", "", "| model | Elo | interval |", "|---|---:|---|"]
    lines += [f"| {m} | {e['elo']:.1f} | {e['lo']:.1f} - {e['hi']:.1f} |" for m, e in out.elo.items()]
  for field, title in (("by_level", "level"), ("by_capability", "capability")):
    groups = sorted({g for m in metrics for g in m[field]})
    if not groups:
      continue
    lines += ["", f"## Win / tie / lose per {title}", "",
              "| model | vs | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
    for m in metrics:
      cells = [f"{c['win']}/{c['tie']}/{c['lose']}" if (c := m[field].get(g)) else "-" for g in groups]
      lines.append(f"| {m['model']} | {m['opponent']} | " + " | ".join(cells) + " |")
  if out.skipped:
    lines += ["", f"## Skipped ({len(out.skipped)})", "", "| sample | model | reason |", "|---|---|---|"]
    lines += [f"| {s.sample_id} | {s.model or 'all'} | {s.reason.replace('|', '/')} |" for s in out.skipped]
  return "\n".join(lines) + "\n"


def write_outputs(workdir: str, out: RunOutput, judge_identity: str, judge_decoding: dict,
                  config: Any = None, models: dict | None = None, reference: str | None = None,
                  run: dict | None = None) -> dict[str, str]:
  """Writes judgements.jsonl, results.json and leaderboard.md under `workdir`; returns their paths."""
  paths = {name: fileio.join(workdir, name) for name in ("judgements.jsonl", "results.json", "leaderboard.md")}
  atomic_write(paths["judgements.jsonl"],
               "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out.records))
  atomic_write(paths["results.json"],
               json.dumps(results_dict(out, judge_identity, judge_decoding, config, models, reference, run), indent=2,
                          ensure_ascii=False, default=str) + "\n")
  atomic_write(paths["leaderboard.md"], leaderboard_markdown(out))
  return paths
