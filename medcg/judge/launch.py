"""From a config to a finished judge run: load inputs, build the judge, run, write the outputs.

Answer files, questions, criteria, images and the workdir may be local or gs://; the SQLite cache is local.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import ml_collections

from medcg import fileio
from medcg.errors import ConfigError
from medcg.judge import data as data_lib
from medcg.judge import protocol, report, runner
from medcg.judge.cache import JudgeCache, JudgeCacheError, check_local
from medcg.judge.clients import HttpJudge
from medcg.train import run_record  # git commit and package versions (no device is touched)

log = logging.getLogger(__name__)


def _paths(value: Any) -> list[str]:
  if isinstance(value, str):
    return [p.strip() for p in value.split(",") if p.strip()]
  return [str(p) for p in value]


def load_samples(cfg: ml_collections.ConfigDict) -> tuple[list[data_lib.Sample], list[data_lib.Skip]]:
  """Samples of `cfg.data` (and records a reader rejected, as skips)."""
  paths = _paths(cfg.path)
  if not paths:
    raise ConfigError("config data.path is empty: give questions.json or Med-MAT JSON files")
  if cfg.format == "mllm_bench":
    if len(paths) != 1:
      raise ConfigError(f"config data.path: MLLM-Bench takes one questions.json, got {paths}")
    samples = data_lib.load_mllm_bench(paths[0], cfg.criteria_path or None, cfg.image_root or None)
    skips = []
  elif cfg.format == "medmat":
    samples, skips, seen = [], [], {}
    for p in paths:
      got, skipped = data_lib.load_medmat_freeform(p, cfg.image_root or None)
      for s in got:
        if s.id in seen:
          raise data_lib.JudgeDataError(f"{p}: sample id {s.id!r} also appears in {seen[s.id]}")
        seen[s.id] = p
      samples += got
      skips += skipped
  else:
    raise ConfigError(f"config data.format must be 'mllm_bench' or 'medmat', got {cfg.format!r}")
  if cfg.limit:
    samples = samples[:cfg.limit]
  return samples, skips


class AnswerNameClash(ConfigError):
  """Two answer files resolve to the same model name (their judgements would be merged)."""


def answer_specs(value: Any, key: str) -> list[tuple[str | None, str]]:
  """(name or None, path) per entry of a comma-separated `NAME=PATH` / `PATH` list (config `key`).

  An entry is NAME=PATH when the text before its first '=' has no '/' (so `runs/lr=1e-4/x.jsonl` and
  `gs://b/k=v/x.jsonl` stay paths); write `./lr=1e-4/x.jsonl` for a relative path whose first folder has '='.
  """
  out = []
  for entry in _paths(value):
    head, sep, tail = entry.partition("=")
    if not sep or "/" in head:
      out.append((None, entry))
      continue
    name, path = head.strip(), tail.strip()
    if not name or not path:
      raise ConfigError(f"config {key}: entry {entry!r} must be PATH or NAME=PATH, with both parts non-empty")
    out.append((name, path))
  return out


def _read_answer_file(name: str | None, path: str, key: str) -> data_lib.AnswerFile:
  if name and not fileio.exists(path):  # say how the entry was read: `lr=1e-4/x.jsonl` is NAME=PATH
    raise data_lib.JudgeDataError(
        f"{path}: file not found (config {key} entry {name}={path} read as NAME=PATH, name {name!r}; for a "
        f"path whose first folder has '=', write ./{name}={path})")
  return data_lib.read_answers(path, name)


def _clash(first: data_lib.AnswerFile, second: data_lib.AnswerFile) -> AnswerNameClash:
  if first.path == second.path:
    where = f"answer file {first.path} is listed twice, so both entries have"
  else:
    where = f"answer files {first.path} ({first.name_from}) and {second.path} ({second.name_from}) both have"
  return AnswerNameClash(
      f"{where} the model name {first.name!r}; give each its own name with NAME=PATH in config "
      f"answers.reference / answers.candidates, e.g. --config.answers.candidates=run_a={first.path},"
      f"run_b={second.path}")


def load_all_answers(cfg: ml_collections.ConfigDict
                     ) -> tuple[str, dict[str, dict[str, data_lib.Answer]], dict[str, dict]]:
  """(reference model name, {model name: {sample id: Answer}}, {model name: file, name source, decoding}).

  Names: NAME=PATH first, then the records' model id, then the file or folder name (data.read_answers);
  two files with one name are an AnswerNameClash naming both.
  """
  refs = answer_specs(cfg.reference, "answers.reference")
  if not refs:
    raise ConfigError("config answers.reference is empty: give the reference model's answer file")
  if len(refs) > 1:
    raise ConfigError(f"config answers.reference: one answer file (PATH or NAME=PATH), got {cfg.reference!r}")
  files: dict[str, data_lib.AnswerFile] = {}
  for key, specs in (("answers.reference", refs), ("answers.candidates", answer_specs(cfg.candidates,
                                                                                      "answers.candidates"))):
    for name, path in specs:
      f = _read_answer_file(name, path, key)
      if f.name in files:
        raise _clash(files[f.name], f)
      files[f.name] = f
  if len(files) < 2:
    raise ConfigError("config answers.candidates is empty: nothing to compare with the reference")
  info = {}
  for model, f in files.items():
    settings = {json.dumps(a.decoding, sort_keys=True) for a in f.answers.values()}
    info[model] = {"answers": f.path, "name_from": f.name_from, "n_answers": len(f.answers),
                   "decoding": [json.loads(d) for d in sorted(settings)]}
  reference = next(iter(files))
  return reference, {m: f.answers for m, f in files.items()}, info


def make_judge(cfg: ml_collections.ConfigDict):
  """An HttpJudge or a local medcg-model judge from `cfg.judge`."""
  if cfg.kind == "http":
    return HttpJudge(url=cfg.url, model=cfg.model, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s,
                     max_retries=cfg.max_retries, backoff_initial_s=cfg.backoff_initial_s,
                     backoff_max_s=cfg.backoff_max_s, concurrency=cfg.concurrency,
                     temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                     seed=None if cfg.seed < 0 else cfg.seed, auth_header=cfg.auth_header)
  if cfg.kind == "local":
    from medcg.judge import local  # imports jax; only local judges pay for it
    return local.medcg_judge(cfg)
  raise ConfigError(f"config judge.kind must be 'http' or 'local', got {cfg.kind!r}")


def cache_path_for(config: ml_collections.ConfigDict) -> str:
  """The SQLite cache file: `cache.path`, else `<workdir>/judge_cache.sqlite`; always local (SQLite needs it)."""
  if config.cache.path:
    check_local(config.cache.path)
    return config.cache.path
  if fileio.is_remote(config.workdir):
    raise JudgeCacheError(f"config cache.path is empty, so the judge cache would be {config.workdir}/"
                          "judge_cache.sqlite; the cache is an SQLite file, and SQLite needs a local path: with a "
                          "gs:// workdir set --config.cache.path to a local file, e.g. runs/judge_cache.sqlite")
  return os.path.join(config.workdir, "judge_cache.sqlite")


def label_policy_for(config: ml_collections.ConfigDict, override: str | None = None) -> str:
  """The run's label policy: `override` (the --label_policy flag), else `protocol.label_policy`, else the
  default ("last_line"); an unknown value is a ConfigError naming where it came from."""
  if override is not None:
    return protocol.check_label_policy(override, "--label_policy")
  policy = config.protocol.get("label_policy", protocol.DEFAULT_LABEL_POLICY)
  return protocol.check_label_policy(policy, "config protocol.label_policy")


def max_unparsed_rate_for(config: ml_collections.ConfigDict) -> float:
  """`protocol.max_unparsed_rate` (runner's default where an older config lacks it), checked."""
  rate = config.protocol.get("max_unparsed_rate", runner.DEFAULT_MAX_UNPARSED_RATE)
  return runner.check_max_unparsed_rate(rate, "config protocol.max_unparsed_rate")


def run_config(config: ml_collections.ConfigDict, read_cache: bool = True, judge=None,
               label_policy: str | None = None) -> dict[str, str]:
  """Runs the judge evaluation of `config` and writes its outputs; returns their paths.

  `judge` replaces the one the config describes (tests, or a judge built in a notebook); `label_policy`
  replaces `config.protocol.label_policy`.
  """
  cache_path = cache_path_for(config)  # first: a bad cache path or label policy fails before anything loads
  policy = label_policy_for(config, label_policy)
  max_unparsed = max_unparsed_rate_for(config)
  samples, reader_skips = load_samples(config.data)
  reference, answers, models = load_all_answers(config.answers)
  judge = judge or make_judge(config.judge)
  fileio.makedirs(config.workdir)
  with JudgeCache(cache_path) as cache:
    out = runner.run_judging(samples, answers, reference, judge, cache, pairing=config.protocol.pairing,
                             require_criteria=config.data.require_criteria,
                             read_cache=read_cache and config.cache.read,
                             elo_rounds=config.protocol.elo_rounds, elo_seed=config.protocol.elo_seed,
                             label_policy=policy, max_unparsed_rate=max_unparsed)
  out.skipped[:0] = reader_skips
  run = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": run_record.git_commit(),
         "packages": run_record.package_versions(), "argv": sys.argv}
  paths = report.write_outputs(config.workdir, out, judge.identity, judge.decoding, config.to_dict(),
                               models=models, reference=reference, run=run)
  s = out.stats
  log.info("judged %d calls (%d cached, %d sent, %d unparsed, %d failed); %d skipped; wrote %s",
           s["calls"], s["cached"], s["sent"], s["unparsed"], s["failed_calls"], len(out.skipped),
           ", ".join(paths.values()))
  if s["conflicting_label_replies"]:
    log.info("%d replies had label lines that disagree (label_policy=%s)", s["conflicting_label_replies"],
             s["label_policy"])
  if not s["calls"]:
    log.warning("nothing was judged: every sample was skipped (see the Skipped section of %s)",
                paths["leaderboard.md"])
  if s["failed_calls"] or s["unparsed"]:
    log.warning("%d judge calls failed and %d replies did not parse; rerun the same command to retry "
                "only those (parsed judgements are cached)", s["failed_calls"], s["unparsed"])
  for warning in out.warnings:  # last, so it is what the user reads (also in the report)
    log.warning("%s", warning)
  return paths
