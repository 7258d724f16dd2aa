"""Is the data there? The early check of shards and tokenizer against experiment configs, before anything runs.

A run whose data is short fails only when its pipeline opens the shards: after the model is built, after
the other arms of a sweep have trained for minutes. `check_data(config)` answers from the manifest alone
(no image is read; milliseconds for local data, one small read per shards dir on gs://): the shards dir and
its `manifest.json` exist, the shards' image size is the config's, every mixture entry's subset and split
are there with at least n records (n = -1: at least one), and the tokenizer file exists when its kind reads
one. `check_all(configs)` checks every arm of a sweep and reports every problem at once, each naming the runs
it stops. Messages say what is missing (subset, split, needed and available counts; the path) and the exact
commands that build it: `python -m medcg.data synth / convert / tokenizer` at the sizes the configs need for
SynthMAT, `convert` and `tokenizer` for the real Med-MAT release.

Label balance (`data.balance_labels`) adds no condition: the pipeline's round robin over labels
(`pipeline.select_indices`) fills any n up to the split's count, so the count check covers it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
from typing import Any, Mapping

from medcg import fileio
from medcg import mat
from medcg.errors import ConfigError, UserError

# `python -m medcg.data tokenizer DIR --vocab_size V` writes DIR/tokenizer-bpe<V>.json.
_CORPUS_TOKENIZER = re.compile(r"tokenizer-bpe(\d+)\.json")
_FILE_KINDS = ("hf", "sentencepiece")  # tokenizer kinds that read a file ("byte" needs none)


class DataNotReady(UserError):
  """Shards or a tokenizer a run needs are missing or too small; the message says how to build them."""


@dataclasses.dataclass(frozen=True)
class _Need:
  key: str          # the config key, e.g. data.mixture[1]
  subset: int
  split: str
  n: int            # records needed (1 for n = -1: every record, at least one)


@dataclasses.dataclass
class _Tokenizer:
  key: str
  kind: str
  vocab: int | None  # the corpus BPE `python -m medcg.data tokenizer` builds, else None (a file of its own)
  runs: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Short:
  needed: int
  keys: list[str] = dataclasses.field(default_factory=list)
  runs: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Dir:
  """What the checked runs need of one shards dir, and what is wrong with it (arms share one dir)."""
  path: str
  manifest: Any = None
  broken: str = ""            # the dir or its manifest is unusable: nothing else is checked
  missing: bool = False       # no dir at all
  synth: bool = False
  runs: list[str] = dataclasses.field(default_factory=list)
  sizes: dict[int, list[str]] = dataclasses.field(default_factory=dict)        # data.image_size -> runs
  needed: dict[tuple[int, str], int] = dataclasses.field(default_factory=dict)  # largest need per split
  short: dict[tuple[int, str], _Short] = dataclasses.field(default_factory=dict)
  tokenizers: dict[str, _Tokenizer] = dataclasses.field(default_factory=dict)  # missing files by path


def _synth_defaults() -> tuple[int, int]:
  """SynthMAT train / test samples per subset where no entry names a count (the configs' defaults)."""
  try:
    from configs import common  # the experiment configs own these sizes
    return common.SYNTH_TRAIN, common.SYNTH_TEST
  except ImportError:  # medcg used without the repository's configs/
    return 600, 60


def _is_synth(config) -> bool:
  """SynthMAT data, as configs/common.py records it (experiment.data_counts = "synth_train=N")."""
  exp = config.get("experiment") or {}
  if exp.get("data_kind"):
    return exp.get("data_kind") == "synth"
  return str(exp.get("data_counts", "")).startswith("synth")


def _entries(config) -> list[_Need]:
  """Every mixture entry the run reads; the untrained arm (train.steps = 0) reads no training mixture.

  An empty mixture reads nothing (a run without evaluation); whether a run may lack one is the trainer's
  config check, not a data question.
  """
  from medcg.data import pipeline  # the pipeline's own entry validation (subset ids, n)
  groups = [("data.mixture", config.data.mixture)] if int(config.train.get("steps", -1)) != 0 else []
  groups.append(("data.eval_mixture", config.data.get("eval_mixture") or []))
  out = []
  for key, mixture in groups:
    if not mixture:
      continue
    try:
      parsed = pipeline.parse_mixture(mixture)
    except ValueError as e:  # its messages say data.mixture for both
      raise ConfigError(f"config {key}{str(e).removeprefix('data.mixture')}") from None
    out += [_Need(f"{key}[{i}]", e.subset, e.split, e.n_samples or 1) for i, e in enumerate(parsed)]
  return out


def _tokenizer_files(config) -> list[tuple[str, str, str]]:
  """(config key, kind, path) of every tokenizer file the run reads."""
  d = config.data
  out = []
  tok = d.get("tokenizer") or {}
  if tok.get("kind", "byte") in _FILE_KINDS:
    out.append(("data.tokenizer.path", tok["kind"], str(tok.get("path") or "")))
  clip = d.get("clip_text") or {}
  clip_tok = clip.get("tokenizer") or {}
  trim_on = bool((config.get("trim") or {}).get("enabled")) or bool(clip.get("enabled"))
  if trim_on and clip_tok.get("kind") == "clip":
    out.append(("data.clip_text.tokenizer.path", "clip", str(clip_tok.get("path") or "")))
  return out


def _open(path: str) -> _Dir:
  from medcg.data import shards as shards_lib
  dd = _Dir(path)
  if not path:
    dd.broken = "config data.shards_dir is empty"
  elif not fileio.exists(path):
    dd.missing, dd.broken = True, f"{path}: no such directory (config data.shards_dir)"
  else:
    try:
      dd.manifest = shards_lib.Manifest.load(path, check_files=False)
    except (shards_lib.ManifestError, ValueError, KeyError, OSError) as e:
      dd.broken = str(e)
  return dd


def _available(manifest, subset: int, split: str) -> int | None:
  """Records of the subset's split; None when the subset is not in the shards at all."""
  sub = manifest.data["subsets"].get(f"{subset:02d}")
  if sub is None:
    return None
  return int(sub["splits"].get(split, {}).get("count", 0))


def _add(dirs: dict[str, _Dir], run: str, config, *, check_local: bool, check_tokenizer: bool) -> None:
  """Records one run's needs (and what its shards dir lacks) in `dirs`."""
  path = str(config.data.shards_dir)
  if not check_local and not fileio.is_remote(path):
    return
  dd = dirs.get(path) or dirs.setdefault(path, _open(path))
  dd.runs.append(run)
  dd.synth = dd.synth or _is_synth(config)
  dd.sizes.setdefault(int(config.data.image_size), []).append(run)
  for e in _entries(config):
    k = (e.subset, e.split)
    dd.needed[k] = max(dd.needed.get(k, 1), e.n)
    if dd.manifest is not None and e.n > (_available(dd.manifest, *k) or 0):
      short = dd.short.setdefault(k, _Short(e.n))
      short.needed = max(short.needed, e.n)
      short.keys += [e.key] if e.key not in short.keys else []
      short.runs += [run] if run not in short.runs else []
  for key, kind, tok_path in _tokenizer_files(config):
    if not check_local and not fileio.is_remote(tok_path):
      continue
    m = _CORPUS_TOKENIZER.fullmatch(os.path.basename(tok_path))
    in_shards = os.path.normpath(os.path.dirname(tok_path)) == os.path.normpath(path)
    vocab = int(m.group(1)) if m and in_shards else None
    # A corpus tokenizer in a missing shards dir is missing too, and built with it: no lookup needed.
    if not check_tokenizer or (tok_path and not (dd.missing and vocab) and fileio.exists(tok_path)):
      continue
    tok = dd.tokenizers.setdefault(tok_path, _Tokenizer(key, kind, vocab))
    tok.runs += [run] if run not in tok.runs else []


def _synth_src_for(shards_dir: str) -> str:
  """Where SynthMAT's JSON + PNGs go for a shards dir: data/synthmat for data/synthmat_shards."""
  d = shards_dir.rstrip("/")
  return d[:-len("_shards")] if d.endswith("_shards") else d + "_src"


def _commands(dd: _Dir, *, rebuild: bool, tokenizer: bool, synth_src: str | None,
              synth_test: int | None) -> list[str]:
  """The commands that build what `dd` lacks: synth + convert for SynthMAT (convert for the release),
  then the corpus tokenizer when it is missing."""
  out = []
  size = str(next(iter(dd.sizes))) if len(dd.sizes) == 1 else "SIZE"
  # The existing shards were converted from here: rebuild in place, so convert keeps what it can.
  source_root = str((dd.manifest.data.get("source_root") if dd.manifest else "") or "")
  if rebuild:
    if dd.synth:
      train_default, test_default = _synth_defaults()
      counts = lambda split: [n for (_, sp), n in dd.needed.items() if sp == split and n > 1]
      src = synth_src or source_root or _synth_src_for(dd.path)
      cmd = ["python", "-m", "medcg.data", "synth", "--out", src, "--image_size", size,
             "--per_subset", str(max(counts("train") or [train_default])),
             "--test_per_subset", str(max(counts("test") + [synth_test or test_default]))]
      if any(s in mat.DETECTION_SUBSETS for s, _ in dd.needed):
        cmd.append("--detection")
      out.append(shlex.join(cmd))
    else:
      src = source_root or "MED_MAT_RELEASE_ROOT"
    cmd = ["python", "-m", "medcg.data", "convert", "--src", src, "--out", dd.path, "--image_size", size]
    if dd.manifest is not None and dd.manifest.format != "tfrecord":
      cmd += ["--format", dd.manifest.format]  # the same format, so kept subsets are not rebuilt
    out.append(shlex.join(cmd))
  vocab = next((t.vocab for t in dd.tokenizers.values() if t.vocab), None)
  if tokenizer and vocab:
    out.append(shlex.join(["python", "-m", "medcg.data", "tokenizer", dd.path, "--vocab_size", str(vocab)]))
  return out


def _runs_note(runs: list[str], total: int) -> str:
  if total <= 1:
    return ""
  if len(runs) == total:
    return ""  # the headline counts them
  return f" [{', '.join(runs)}]"


def _problems(dd: _Dir, total: int) -> tuple[list[str], set[str]]:
  """One line per problem of `dd` (data first, then tokenizers) and the runs they stop."""
  lines, failing = [], set()
  if dd.broken:
    lines.append(dd.broken + _runs_note(dd.runs, total))
    failing.update(dd.runs)
  else:
    for size, runs in sorted(dd.sizes.items()):
      if size != dd.manifest.image_size:
        lines.append(f"{fileio.join(dd.path, 'manifest.json')}: the shards are {dd.manifest.image_size} px, "
                     f"config data.image_size is {size}{_runs_note(runs, total)}")
        failing.update(runs)
    absent: dict[tuple[str, tuple[str, ...]], list[tuple[int, int]]] = {}  # not converted: one line per split
    for (subset, split), s in sorted(dd.short.items()):
      failing.update(s.runs)
      available = _available(dd.manifest, subset, split)
      if available is None:
        absent.setdefault((split, tuple(s.runs)), []).append((subset, s.needed))
        continue
      lines.append(f"subset {subset:02d} split {split!r}: {s.needed} needed ({', '.join(s.keys)}), {available} "
                   f"available in {dd.path}{_runs_note(s.runs, total)}")
    for (split, runs), subsets in absent.items():
      ns = sorted({n for _, n in subsets})
      needed = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
      present = ", ".join(f"{int(k):02d}" for k in sorted(dd.manifest.data["subsets"])) or "none"
      lines.append(f"subset{'s' if len(subsets) > 1 else ''} {', '.join(f'{x:02d}' for x, _ in subsets)} split "
                   f"{split!r}: {needed} needed each, not in {dd.path} (it holds subsets {present})"
                   f"{_runs_note(list(runs), total)}")
  for path, t in dd.tokenizers.items():
    if dd.missing and t.vocab:
      continue  # the shards dir is missing: the tokenizer comes with it (the commands below)
    what = f"{path}: no such file" if path else "is empty"
    hint = "" if t.vocab else " (not a medcg corpus tokenizer: give the path of the model's own file)"
    lines.append(f"config {t.key} ({t.kind} tokenizer) {what}{hint}{_runs_note(t.runs, total)}")
    failing.update(t.runs)
  return lines, failing


def check_all(configs: Mapping[str, Any], *, tokenizer: bool = True, check_local: bool = True,
              synth_src: str | None = None, synth_test: int | None = None) -> None:
  """Checks the data of several runs (every arm of a sweep, keyed by arg string) before any runs.

  Raises one `DataNotReady` listing every problem, each with the runs it stops, and the commands that fix
  them all. `tokenizer=False` leaves tokenizer files out (a caller that builds them itself, like the demo);
  `check_local=False` checks only remote (gs://) paths (a pod launcher: local paths are the workers').
  `synth_src` / `synth_test`: the SynthMAT source dir and test size the suggested commands use.
  """
  dirs: dict[str, _Dir] = {}
  for run, config in configs.items():
    _add(dirs, run, config, check_local=check_local, check_tokenizer=tokenizer)
  lines, commands, failing = [], [], set()
  for dd in dirs.values():
    found, stopped = _problems(dd, len(configs))
    if not found:
      continue
    lines += found
    failing |= stopped
    commands += _commands(dd, rebuild=bool(dd.broken or dd.short or any(
        s != dd.manifest.image_size for s in dd.sizes)), tokenizer=bool(dd.tokenizers), synth_src=synth_src,
                          synth_test=synth_test)
  if not lines:
    return
  total = len(configs)
  head = f"data not ready for {len(failing)} of {total} runs: " if total > 1 else "data not ready: "
  text = head + lines[0] + "".join("\n  " + line for line in lines[1:])
  if commands:
    text += "\nbuild it with:\n" + "\n".join("  " + c for c in commands)
  raise DataNotReady(text)


def check_data(config, *, what: str = "", tokenizer: bool = True) -> None:
  """Checks one run's data (see the module docstring); `what` names the run in the message."""
  try:
    check_all({what: config}, tokenizer=tokenizer)
  except DataNotReady as e:
    if not what:
      raise
    raise DataNotReady(str(e).replace("data not ready: ", f"data not ready for {what}: ", 1)) from None
