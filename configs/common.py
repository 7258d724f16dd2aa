"""Shared pieces of the experiment configs: run args, data sizes, model + recipe, arms, sweeps, collection.

Every experiment config (`configs/cg_table3.py`, ...) takes the same run args besides its own selector:

  arm          which arm of the experiment this run is (experiment-specific; `baseline` = untrained, eval only)
  seed         model init, data selection and shuffle seed
  data         synth (default: SynthMAT, CPU-sized) | medmat (the real release, paper-sized)
  model        a preset of configs/models.py; default tiny for synth, llava-1.5-7b for medmat
  shards       the converted shards dir; default data/synthmat_shards (synth) or data/medmat_shards (medmat)
  hf           medmat: a local Hugging Face checkpoint dir (weights + tokenizer.json) to start from
  synth_train  SynthMAT train samples per subset (600: the paper's 3,000 cap scaled by 0.2)
  synth_test   SynthMAT test samples per subset (60)
  epochs       0 = the recipe's (tiny 12, pretrained presets 5)
  init         a finished run's workdir whose params start this run (`train.init_from`), e.g. a run of
               your own stage-1 pretraining
  ood_train    medmat without a manifest (planning / printing only): assumed train count of OOD subsets

SynthMAT shards that match the synth defaults:

  python -m medcg.data synth --out data/synthmat --image_size 32 --per_subset 600 --test_per_subset 60
  python -m medcg.data convert --src data/synthmat --out data/synthmat_shards --image_size 32
  python -m medcg.data tokenizer data/synthmat_shards --vocab_size 512

Sizes. data=synth counts every classification subset at `synth_train` and scales the paper's numbers by
`synth_train / 3000` (cap 3,000 -> 600, scaling total 15,000 -> 3,000, Fig. 6's 2,000 target samples -> 400).
data=medmat reads the counts from `<shards>/manifest.json` when it exists, else plans with the release's
shape (`splits.release_counts()`: ID subsets at 3,000, OOD subsets at `ood_train`); the pipeline fails on
a subset that is not there, so the planning counts never reach a real run unnoticed.

Recipes follow the model, not the data. From-scratch presets (tiny, tiny-qwen2vl; models.FROM_SCRATCH): the
corpus BPE tokenizer (`python -m medcg.data tokenizer DIR`; a prompt is ~90 BPE tokens instead of ~220 bytes), the
preset's small image (tiny 32 px, tiny-qwen2vl 112 px), AdamW lr 2e-3, global batch 32.
Pretrained presets (paper §2.2 / App. A.5-A.6): 5 epochs, global batch 32, lr 5e-6 for
LLaVA (2e-6 for Qwen2-VL / Llama-3.2-V), bf16 compute, the vision tower (and CLIP's text tower, present only with
TRIM) frozen, FSDP mesh, the family's chat template (LLaVA-1.5 `llava_v1`; Qwen2-VL `qwen2_vl` with the
checkpoint's tokenizer.json); `hf=DIR` starts from local weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections

from configs import models
from medcg import configlib
from medcg import mat
from medcg import paper
from medcg import splits
from medcg.data import prompt
from medcg.eval import report

DATA_KINDS = ("synth", "medmat")
SYNTH_SHARDS = "data/synthmat_shards"
MEDMAT_SHARDS = "data/medmat_shards"
SYNTH_TRAIN = 600
SYNTH_TEST = 60
SYNTH_IMAGE_SIZE = 32       # the tiny model's input side (16 image tokens at patch 8): CPU-sized
SYNTH_SEQ_LEN = 112          # 16 image tokens + the BPE prompt (~90 tokens for the longest SynthMAT questions)
CORPUS_VOCAB = 512           # the BPE tokenizer from-scratch models use (`python -m medcg.data tokenizer`)
SYNTH_LR = 2e-3
SYNTH_EPOCHS = 12            # tiny from scratch: ~450 steps of 32 for a 1,200-sample arm
MEDMAT_EPOCHS = 5            # pretrained presets: the paper's recipe
MEDMAT_SEQ_LEN = 1024        # 576 image tokens + the LLaVA system prompt + question and options
GLOBAL_BATCH = 32
DEFAULT_OOD_TRAIN = 1000
# Paper learning rates by backbone family (§2.2, App. A.5); medcg presets are LLaVA-1.5.
RECIPE_LR = {"llava": 5e-6, "qwen2-vl": 2e-6, "llama-3.2-v": 2e-6}
# Param path prefixes: LLaVA (medcg.model.vlm.VLM) vision / text (CLIP towers), projector, llm; Qwen2-VL
# (medcg.model.qwen_vl.QwenVLM) vision, merger, llm. One regex for both towers: the text tower exists only with
# TRIM, and the vision tower always matches (the trainer rejects a freeze pattern that matches nothing), so
# `--config.trim.enabled=True` needs no freeze change. The projector / merger and the LLM are trained.
FROZEN_TOWERS = ("(vision|text)/.*",)


def corpus_tokenizer_path(shards_dir: str) -> str:
  """Where `python -m medcg.data tokenizer DIR --vocab_size CORPUS_VOCAB` writes the BPE tokenizer."""
  return os.path.join(shards_dir, f"tokenizer-bpe{CORPUS_VOCAB}.json")


# Every run arg the configs share (see the module docstring), with its default; sweeps pass all but `seed` through.
COMMON_RUN_ARGS = dict(seed=0, data="synth", model="", shards="", hf="", synth_train=SYNTH_TRAIN,
                       synth_test=SYNTH_TEST, epochs=0, ood_train=DEFAULT_OOD_TRAIN, init="", hw="")


def run_args(arg: str | None, **experiment: Any) -> ml_collections.ConfigDict:
  """Parses a run's arg string against the experiment's own defaults plus the common run args."""
  clashes = sorted(set(experiment) & set(COMMON_RUN_ARGS))
  if clashes:
    raise ValueError(f"experiment arg {clashes[0]!r} clashes with a common run arg")
  defaults = {**experiment, **COMMON_RUN_ARGS}
  args = configlib.parse_arg(arg, **defaults)
  if args.data not in DATA_KINDS:
    raise ValueError(f"config arg 'data': expected one of {DATA_KINDS}, got {args.data!r}")
  if args.synth_train < 1 or args.synth_test < 1:
    raise ValueError(f"config args synth_train / synth_test must be positive, got {args.synth_train} / "
                     f"{args.synth_test}")
  if not args.model:
    args.model = "tiny" if args.data == "synth" else "llava-1.5-7b"
  return args


def check_choice(args, key: str, choices: Sequence[Any]) -> None:
  """An arg outside its choices fails naming the arg and the choices."""
  if args[key] not in choices:
    raise ValueError(f"config arg {key!r}: expected one of {list(choices)}, got {args[key]!r}")


# ---------------------------------------------------------------------------------------------------
# Data sizes.

@dataclasses.dataclass(frozen=True)
class DataSetting:
  """Where the shards are and how many samples each subset offers; `scale` sizes the paper's numbers."""
  kind: str
  shards_dir: str
  counts: Any                   # {subset: train count} or a medcg.data.shards.Manifest
  scale: float
  source: str                   # where the counts came from, for the run record

  def scaled(self, n: int) -> int:
    """A paper sample count (a cap, a total) at this data's size."""
    return max(1, int(round(n * self.scale)))


def synth_image_size(model: str) -> int:
  """The SynthMAT side a from-scratch preset reads: 32 px for tiny, its static grid otherwise (112 px for
  tiny-qwen2vl). Pretrained-size presets map to the default 32 px directories (their runs on SynthMAT need shards
  converted at their own size; medcg.preflight names the command)."""
  if model in models.FROM_SCRATCH and model != "tiny":
    return int(models.get(model).vision.image_size)
  return SYNTH_IMAGE_SIZE


def synth_dirs(model: str) -> tuple[str, str]:
  """(raw SynthMAT dir, shards dir) for a model: data/synthmat[_shards] at 32 px, data/synthmat<S>[_shards] else."""
  size = synth_image_size(model)
  tag = "" if size == SYNTH_IMAGE_SIZE else str(size)
  return f"data/synthmat{tag}", SYNTH_SHARDS.replace("synthmat", f"synthmat{tag}")


def data_setting(args) -> DataSetting:
  """The counts a run plans with: SynthMAT's args, or the medmat manifest (or the release's shape)."""
  if args.data == "synth":
    counts = {s: args.synth_train for s in mat.CLASSIFICATION_SUBSETS}
    return DataSetting("synth", args.shards or synth_dirs(args.model)[1], counts, args.synth_train / splits.PER_SUBSET_CAP,
                       f"synth_train={args.synth_train}")
  shards_dir = args.shards or MEDMAT_SHARDS
  from medcg.data import shards as shards_lib
  if os.path.exists(os.path.join(shards_dir, shards_lib.MANIFEST)):
    manifest = shards_lib.Manifest.load(shards_dir, check_files=False)
    return DataSetting("medmat", shards_dir, manifest, 1.0, f"{shards_dir}/{shards_lib.MANIFEST}")
  counts = splits.release_counts(ood_train=args.ood_train)
  return DataSetting("medmat", shards_dir, counts, 1.0, f"release_counts(ood_train={args.ood_train}) (no manifest)")


@contextlib.contextmanager
def sizing(setting: DataSetting):
  """Mixture errors (a subset missing, a pool too small) also say where the counts came from."""
  try:
    yield
  except (ValueError, KeyError) as e:
    raise ValueError(f"{e.args[0] if e.args else e} (sample counts: {setting.source})") from e


def cg_arm_mixture(combo: splits.Combination, arm: str, setting: DataSetting) -> splits.Mixture | None:
  """One arm of a CG experiment: related (the combination), baseline_plus (as many unrelated samples), or
  None for the untrained baseline. Only what the arm needs is sized, so a related run needs no unrelated data."""
  if arm == "baseline":
    return None
  with sizing(setting):
    if arm == "related":
      return splits.combination_mixture(combo, setting.counts, scale=setting.scale)
    if arm == "baseline_plus":
      return splits.cg_mixtures(combo, setting.counts, scale=setting.scale)["baseline_plus"]
  raise ValueError(f"config arg 'arm': expected baseline, baseline_plus or related, got {arm!r}")


def cap(setting: DataSetting) -> int:
  """The per-subset training cap at this data's size (3,000 on the release)."""
  return setting.scaled(splits.PER_SUBSET_CAP)


# ---------------------------------------------------------------------------------------------------
# The config.

def backbone_family(model: str) -> str:
  """The paper's recipe family of a preset name (llava, qwen2-vl, llama-3.2-v)."""
  name = model.lower()
  if name.startswith("qwen"):
    return "qwen2-vl"
  if name.startswith("llama-3.2"):
    return "llama-3.2-v"
  return "llava"


def build_config(args, setting: DataSetting, *, train_mixture: Sequence[Sequence[Any]],
                 eval_mixture: Sequence[Sequence[Any]], trained: bool = True,
                 experiment: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """base_config() filled with the data, model and recipe of `args`, and the two mixtures.

  `trained=False` is the untrained Baseline: `train.steps=0` (the trainer evaluates the initial model only)
  and an empty training mixture. Trained runs leave `train.steps=-1`, so the recipe's epochs decide.
  """
  c = configlib.base_config()
  c.seed = args.seed
  c.data.seed = args.seed
  c.data.shards_dir = setting.shards_dir
  c.data.mixture = [tuple(e) for e in train_mixture]
  c.data.eval_mixture = [tuple(e) for e in eval_mixture]
  c.data.batch_size = GLOBAL_BATCH
  c.data.balance_labels = True
  if trained != bool(c.data.mixture):
    raise ValueError(f"config: a {'trained' if trained else 'baseline (untrained)'} run with "
                     f"{len(c.data.mixture)} training mixture entries")
  if not c.data.eval_mixture:
    raise ValueError("config: the evaluation mixture is empty")

  c.data.truncation = "question"  # only the free-text instruction may shorten, never options or answer
  if args.model in models.FROM_SCRATCH:  # the corpus BPE tokenizer, a small image, a CPU-sized schedule
    c.model = models.get(args.model)
    if args.model == "tiny":
      c.model.vision.image_size = SYNTH_IMAGE_SIZE
    c.data.image_size = c.model.vision.image_size
    c.data.seq_len = SYNTH_SEQ_LEN
    c.data.chat_template = "plain"
    # A from-scratch model answers with the option's text, not its letter: binding a letter to an option
    # is a skill a pretrained LLM brings and 1,200 samples do not teach (experiments/results/demo.md).
    c.data.answer_format = "text"
    c.data.tokenizer.update(dict(kind="hf", path=corpus_tokenizer_path(setting.shards_dir), bos="<s>", eos="</s>",
                                 pad="<pad>", image="<image>"))
    c.train.lr = SYNTH_LR
    c.train.warmup_steps = 20
    c.train.epochs = args.epochs or SYNTH_EPOCHS
  else:  # a pretrained-size preset: the paper's recipe, whichever data it reads (shards are resized)
    c.model = models.get(args.model, dtype="bfloat16", param_dtype="float32", remat="full")
    c.data.image_size = c.model.vision.image_size
    c.data.seq_len = MEDMAT_SEQ_LEN
    qwen = backbone_family(args.model) == "qwen2-vl"
    c.data.chat_template = "qwen2_vl" if qwen else "llava_v1"
    c.train.lr = RECIPE_LR[backbone_family(args.model)]
    c.train.epochs = args.epochs or MEDMAT_EPOCHS
    c.train.warmup_frac = 0.03
    c.train.freeze = FROZEN_TOWERS
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.eval.batch_size = GLOBAL_BATCH
    if args.hf:  # the model config then comes from the checkpoint, with the same compute settings
      c.train.init_from_hf = args.hf
      c.model_overrides.update(dtype="bfloat16", param_dtype="float32", remat="full")
      c.data.tokenizer.kind = "qwen" if qwen else "hf"
      c.data.tokenizer.path = os.path.join(args.hf, "tokenizer.json")
  if args.hw:  # a fit recipe (configs/hardware.py): mesh, remat and accumulation for that target
    if args.model in models.FROM_SCRATCH:
      raise ValueError(f"config arg 'hw': fit recipes are for the pretrained-size presets, not {args.model}")
    from configs import hardware
    hardware.apply(c, args.model, args.hw)
  from medcg.model import vlm
  c.data.num_image_tokens = vlm.num_image_tokens(c.model, c.trim)

  if args.init:
    if args.hf:
      raise ValueError("config args 'init' and 'hf' both set: a run starts from one of them")
    c.train.init_from = args.init
  c.train.steps = -1 if trained else 0
  c.experiment = ml_collections.ConfigDict(dict(experiment or {}))
  c.experiment.data_counts = setting.source
  c.experiment.trained = trained
  return c


def cg_run_config(args, combo: splits.Combination, name: str, **experiment: Any) -> ml_collections.ConfigDict:
  """One arm of a CG combination: its training mixture (the target held out), the target's test split."""
  setting = data_setting(args)
  train = cg_arm_mixture(combo, args.arm, setting)  # None: the untrained Baseline trains on nothing
  train_list = train.as_list() if train else []
  assert_target_held_out(train_list, combo.target)
  return build_config(
      args, setting, train_mixture=train_list, eval_mixture=target_eval(combo.target), trained=train is not None,
      experiment=dict(name=name, arm=args.arm, target=combo.target,
                      mixture=train.describe() if train else "untrained", **experiment))


def target_eval(target: int) -> list[tuple[int, str, int]]:
  """The whole test split of the target (n = -1: every sample)."""
  return [(mat.get(target).id, "test", -1)]


def assert_target_held_out(mixture: Iterable[Sequence[Any]], target: int, allowed: int = 0) -> None:
  """The target's data never enters training, except `allowed` declared samples (Fig. 6)."""
  t = mat.get(target).id
  got = 0
  for subset, split, n in mixture:
    if mat.get(subset).id == t:
      if split != "train" or n in (None, -1):
        raise AssertionError(f"target {t:02d}: its {split} split ({n} samples) is in the training mixture")
      got += n
  if got != allowed:
    raise AssertionError(f"target {t:02d}: {got} of its samples are in the training mixture, {allowed} allowed")


# ---------------------------------------------------------------------------------------------------
# Sweeps.

PASS_THROUGH = tuple(k for k in COMMON_RUN_ARGS if k != "seed")


def sweep_args(arg: str | None, **sweep_defaults: Any) -> ml_collections.ConfigDict:
  """Parses a sweep's base arg: its own keys (seeds, rows, ...) plus the run args every entry carries."""
  defaults = {**sweep_defaults, **{k: COMMON_RUN_ARGS[k] for k in PASS_THROUGH}}
  return configlib.parse_arg(arg, **defaults)


def pass_through(args) -> str:
  """The run args of a sweep's base arg that differ from their defaults, as ",k=v" to append to entries."""
  defaults = sweep_args(None)
  parts = [f"{k}={args[k]}" for k in PASS_THROUGH if args[k] != defaults[k]]
  return "".join("," + p for p in parts)


def int_list(text: Any, where: str) -> list[int]:
  """"3" / "1-14" / "15+25+31" / "1-4+15" -> sorted unique ints ("+" joins, since "," separates args)."""
  out = set()
  for part in str(text).split("+"):
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
    if not m:
      raise ValueError(f"config arg {where!r}: cannot read {text!r}; use e.g. 3, 1-14 or 15+25+31")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if hi < lo:
      raise ValueError(f"config arg {where!r}: empty range {part!r}")
    out.update(range(lo, hi + 1))
  return sorted(out)


def seeds(args) -> list[int]:
  if args.seeds < 1:
    raise ValueError(f"config arg 'seeds' must be >= 1, got {args.seeds}")
  return list(range(args.seeds))


def entry(**kv: Any) -> str:
  """One sweep entry: "k=v,k=v" in the given order."""
  return ",".join(f"{k}={v}" for k, v in kv.items())


# ---------------------------------------------------------------------------------------------------
# Collection.

def parse_entry(arg_string: str) -> dict[str, str]:
  """"row=15,arm=related,seed=0" -> {"row": "15", ...} (the inverse of `entry`)."""
  out = {}
  for item in arg_string.split(","):
    if item:
      key, _, value = item.partition("=")
      out[key.strip()] = value.strip()
  return out


def group_runs(results: Mapping[str, Any], key: Callable[[dict[str, str]], Any]) -> dict[Any, list[Any]]:
  """Results grouped by `key(parsed arg)`, each group's runs ordered by seed (so seeds pair up).

  Each run comes back as a shallow copy carrying its `seed` (reports name the seeds). SynthMAT runs
  evaluated before results recorded the options offered get their subsets' `chance` from the generator's
  label counts (`synth_chance`), so a re-collected table still draws its chance line.
  """
  groups: dict[Any, list[tuple[int, Any]]] = {}
  for arg_string, res in results.items():
    parsed = parse_entry(arg_string)
    seed = int(parsed.get("seed", 0))
    res = {**res, "seed": seed}
    if parsed.get("data", "synth") == "synth":
      res["per_subset"] = {k: ({**v, "chance": synth_chance(int(k))} if "chance" not in v else v)
                           for k, v in res.get("per_subset", {}).items()}
    groups.setdefault(key(parsed), []).append((seed, res))
  return {k: [r for _, r in sorted(v, key=lambda x: x[0])] for k, v in groups.items()}


def runs_label(results: Mapping[str, Any]) -> str:
  """"SynthMAT, tiny" / "Med-MAT, llava-1.5-7b": what a collected figure's title says the runs were."""
  kinds = set()
  for arg_string in results:
    parsed = parse_entry(arg_string)
    data = parsed.get("data", "synth")
    model = parsed.get("model") or ("tiny" if data == "synth" else "llava-1.5-7b")
    kinds.add(f"{'SynthMAT' if data == 'synth' else 'Med-MAT'}, {model}")
  return "; ".join(sorted(kinds))


def synth_chance(subset: int) -> float | None:
  """Chance on a SynthMAT subset: every question offers min(4, labels) options (`medcg.data.synth`)."""
  from medcg.data.synth import spec as synth_spec
  labels = synth_spec.LABELS.get(subset)
  return None if not labels else 1.0 / min(len(labels), len(prompt.LETTERS))


def decisions(entries: Sequence[report.CGEntry], key: Callable[[report.CGEntry], Any]) -> dict[str, Any]:
  """{row: the CG test's result} for the collected JSON (null where an arm is missing)."""
  out = {}
  for e in entries:
    d = e.decision()
    out[str(key(e))] = None if d is None else d.to_dict()
  return out


def cg_entries(results: Mapping[str, Any], key: str, combo_of: Callable[[int], splits.Combination],
               paper_row_of: Callable[[int], paper.CGRow | None]) -> list[report.CGEntry]:
  """CGEntry per selector value (`key`, e.g. row), arms from the runs' `arm` arg, in selector order."""
  by = group_runs(results, lambda p: (int(p[key]), p.get("arm", "related")))
  selectors = sorted({sel for sel, _ in by})
  return [report.CGEntry(combo_of(sel), {arm: by[(s, arm)] for (s, arm) in by if s == sel}, paper_row_of(sel))
          for sel in selectors]

