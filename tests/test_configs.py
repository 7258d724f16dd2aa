"""Experiment configs: every sweep entry builds, mixtures follow the paper's rules, sweeps print, collect renders."""
from __future__ import annotations

import builtins
import contextlib
import importlib
import json
import os
import random
import re
import shlex

import pytest

from configs import common
from medcg import mat
from medcg import paper
from medcg import splits

MODULES = ("cg_table3", "cg_three_source", "scaling", "multitask", "limited_data", "cross_backbone", "demo",
           "cls_det")
CG_MODULES = ("cg_table3", "cg_three_source", "cross_backbone", "demo", "cls_det")
NO_SHARDS = "/nonexistent/medcg_shards"      # medmat planning counts: no manifest there
MEDMAT = f"data=medmat,model=llava-1.5-7b,shards={NO_SHARDS}"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(name):
  return importlib.import_module(f"configs.{name}")


@contextlib.contextmanager
def _no_file_io():
  """Building a config must not open a file (no shards, no manifest, no weights)."""
  real_open = builtins.open

  def guarded(file, *a, **k):
    raise AssertionError(f"config building opened {file!r}")

  builtins.open = guarded
  try:
    yield
  finally:
    builtins.open = real_open


_BUILT: dict[tuple[str, str], list] = {}


def _built(name: str, base: str | None):
  """(arg, config) for every sweep entry of a module, built once per test session."""
  key = (name, base or "")
  if key not in _BUILT:
    module = _module(name)
    args = module.get_sweep(base) if base else module.get_sweep()
    module.get_config(args[0])  # first build imports the libraries (which read files); then no file may open
    with _no_file_io():
      _BUILT[key] = [(a, module.get_config(a)) for a in args]
  return _BUILT[key]


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("base", [None, MEDMAT], ids=["synth", "medmat"])
def test_every_sweep_entry_builds(name, base):
  runs = _built(name, base)
  assert runs, f"{name}: empty sweep"
  args = [a for a, _ in runs]
  assert len(set(args)) == len(args)
  assert args == (_module(name).get_sweep(base) if base else _module(name).get_sweep()), "sweep not deterministic"
  for arg, c in runs:
    assert c.data.eval_mixture, arg
    assert bool(c.data.mixture) == c.experiment.trained, f"{arg}: only trained runs have a training mixture"
    for subset, split, n in c.data.mixture:
      assert split == "train" and n > 0, (arg, subset, split, n)
    if base is None:
      assert c.data.image_size == common.SYNTH_IMAGE_SIZE and c.data.tokenizer.kind == "hf", arg
      assert c.data.tokenizer.path == common.corpus_tokenizer_path(common.SYNTH_SHARDS), arg
      assert c.data.shards_dir == common.SYNTH_SHARDS
    else:
      assert c.model.llm.hidden_size == 4096 and c.data.image_size == 336 and c.data.num_image_tokens == 576, arg
      assert c.train.freeze == common.FROZEN_TOWERS and c.model.llm.dtype == "bfloat16", arg
      assert c.data.shards_dir == NO_SHARDS and c.data.batch_size == 32 and c.train.epochs in (0, 5), arg
    if c.experiment.trained:
      assert c.train.steps == -1 and c.train.epochs > 0, f"{arg}: trained runs follow the recipe's epochs"
    else:
      assert c.train.steps == 0, f"{arg}: the baseline must take no step"


def test_recipes():
  c = _module("cg_table3").get_config(f"row=15,{MEDMAT}")
  assert (c.train.lr, c.train.epochs, c.data.batch_size, c.data.chat_template) == (5e-6, 5, 32, "llava_v1")
  assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, -1, 1)
  c = _module("cg_table3").get_config(f"row=15,{MEDMAT},hf=/ckpt/llava")
  assert c.train.init_from_hf == "/ckpt/llava" and c.data.tokenizer.path == "/ckpt/llava/tokenizer.json"
  assert dict(c.model_overrides) == {"dtype": "bfloat16", "param_dtype": "float32", "remat": "full"}
  assert c.data.tokenizer.kind == "hf"
  c = _module("cross_backbone").get_config(f"row=16,{MEDMAT},model=llava-1.5-13b")
  assert c.train.lr == 5e-6 and c.model.llm.hidden_size == 5120
  with pytest.raises(ValueError, match="qwen2-vl"):
    _module("cross_backbone").get_config(f"row=16,{MEDMAT},backbone=qwen2-vl")
  c = _module("demo").get_config("arm=related")
  assert c.train.lr == common.SYNTH_LR and c.train.epochs == common.SYNTH_EPOCHS and c.train.freeze == ()
  assert _module("demo").get_config("arm=related,epochs=7").train.epochs == 7
  # From scratch answers with the option's text and is scored on it; pretrained presets keep Med-MAT's letter.
  assert c.data.answer_format == "text" and c.eval.likelihood_target == ""
  assert _module("cg_table3").get_config(f"row=15,{MEDMAT}").data.answer_format == "letter"


def test_init_arg_starts_every_arm_from_a_run():
  for arm in ("baseline", "baseline_plus", "related"):
    assert _module("demo").get_config(f"arm={arm},init=/runs/stage1").train.init_from == "/runs/stage1", arm
  assert _module("demo").get_config("arm=related").train.init_from == ""
  with pytest.raises(ValueError, match="'init' and 'hf'"):
    _module("cg_table3").get_config(f"row=15,{MEDMAT},hf=/ckpt/llava,init=/runs/stage1")
  assert _module("demo").get_sweep("init=/runs/stage1")[0].endswith(",init=/runs/stage1")


def test_freeze_patterns_match_the_model():
  import jax
  from flax import nnx
  from medcg.model import vlm
  from medcg.train import optimizer
  c = _module("cg_table3").get_config("row=15,model=tiny")
  assert c.train.freeze == ()
  assert c.data.num_image_tokens == vlm.num_image_tokens(c.model) == (common.SYNTH_IMAGE_SIZE // c.model.vision.patch_size) ** 2
  # What a pretrained preset freezes, checked on the tiny model's tree, without and with TRIM's text tower.
  for trim in (None, dict(enabled=True, mode="iqr_batch", k_max=7, ratio=0.0, impl="xla", text_source="question")):
    model = nnx.eval_shape(lambda: vlm.VLM(c.model, rngs=nnx.Rngs(0), trim=trim))
    params = nnx.state(model, nnx.Param)
    optimizer.check_patterns_match(params, common.FROZEN_TOWERS, "freeze")
    is_frozen = optimizer.frozen_filter(common.FROZEN_TOWERS)
    frozen = {optimizer.param_path(p).split("/")[0] for p, v in jax.tree_util.tree_leaves_with_path(
        nnx.state(model, is_frozen))}
    assert frozen == ({"vision", "text"} if trim else {"vision"})


def test_pretrained_preset_on_synthmat():
  c = _module("demo").get_config("arm=related,model=llava-1.5-7b")
  assert c.data.shards_dir == common.SYNTH_SHARDS and c.data.mixture == [(5, "train", 600), (28, "train", 600)]
  assert (c.data.image_size, c.data.chat_template, c.train.lr, c.train.epochs) == (336, "llava_v1", 5e-6, 5)
  assert c.train.freeze == common.FROZEN_TOWERS


@pytest.mark.parametrize("name", MODULES)
def test_unknown_arg_keys_fail_naming_the_key(name):
  module = _module(name)
  with pytest.raises(KeyError, match="bogus_key"):
    module.get_config("bogus_key=1")
  with pytest.raises(KeyError, match="nope"):
    module.get_sweep("nope=3")


@pytest.mark.parametrize("bad, match", [("arm=trained", "arm"), ("data=real", "data"), ("row=44", "44"),
                                        ("model=gpt-5", "gpt-5")])
def test_bad_values_fail_clearly(bad, match):
  with pytest.raises((KeyError, ValueError), match=match):
    _module("cg_table3").get_config(bad)


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("base", [None, MEDMAT], ids=["synth", "medmat"])
def test_target_never_trained_on(name, base):
  for arg, c in _built(name, base):
    e = c.experiment
    trained = {mat.get(s).id: n for s, _, n in c.data.mixture}
    if name == "multitask":
      assert all(mat.get(s).status == "ID" for s in trained), arg
      evaluated = {mat.get(s).id for s, _, _ in c.data.eval_mixture}
      assert evaluated == ({e.target} if e.arm == "single" else set(mat.CLASSIFICATION_SUBSETS)), arg
      continue
    assert c.data.eval_mixture == [(e.target, "test", -1)], arg
    allowed = e.get("target_samples", 0)
    assert trained.get(e.target, 0) == allowed, arg
    if allowed:  # declared target samples: Fig. 6, and Table 5's fixed amount of target detection data
      assert e.get("fig") == 6 or e.get("table") == 5, f"{arg}: only Fig. 6 / Table 5 may train on target samples"


@pytest.mark.parametrize("name", CG_MODULES)
@pytest.mark.parametrize("base", [None, MEDMAT], ids=["synth", "medmat"])
def test_baseline_plus_matches_related_total(name, base):
  runs = _built(name, base)
  totals = {}
  for arg, c in runs:
    key = tuple(sorted((k, v) for k, v in common.parse_entry(arg).items() if k != "arm"))
    totals.setdefault(key, {})[c.experiment.arm] = c.data.mixture
  cap = 600 if base is None else 3000
  for key, arms in totals.items():
    related, plus = arms["related"], arms.get("baseline_plus")
    if "baseline" in arms:
      assert arms["baseline"] == []
    assert all(n <= cap for _, _, n in related), key
    if plus is not None:
      assert sum(n for *_, n in plus) == sum(n for *_, n in related), key
      target = next(c for a, c in runs if tuple(sorted((k, v) for k, v in common.parse_entry(a).items()
                                                     if k != "arm")) == key).experiment.target
      assert all(not mat.shared_elements(target, s) for s, _, _ in plus if s != target), key  # Table 5 adds target


@pytest.mark.parametrize("base, total, cap", [(None, 3000, 600), (MEDMAT, 15000, 3000)], ids=["synth", "medmat"])
def test_scaling_totals(base, total, cap):
  counts = common.data_setting(common.run_args(base)).counts
  checked = 0
  for arg, c in _built("scaling", base):
    e = c.experiment
    if e.setting == "baseline":
      assert c.data.mixture == [] and c.train.steps == 0, arg
      continue
    got = sum(n for _, _, n in c.data.mixture)
    assert all(n <= cap for _, _, n in c.data.mixture), arg
    reachable = sum(min(splits.available(counts, s), cap) for s in splits.scaling_pool(e.target, e.setting))
    assert got == min(total, reachable), arg
    assert e.shortfall == total - got, arg
    checked += got == total
  assert checked >= 6  # most settings reach the full volume


def test_limited_data_sizes():
  module = _module("limited_data")
  for arg, c in _built("limited_data", None):
    e = c.experiment
    got = sum(n for _, _, n in c.data.mixture)
    if e.fig == 5 and e.arm != "baseline":
      assert got == round(e.n * 0.2), arg
    if e.fig == 6:
      assert e.target_samples == round(e.n * 0.2) and e.row in {r.row for r in paper.TABLE3 if not r.helps}, arg
  for d in paper.DIRECTIONS:
    assert paper.cg_gain(module.chosen_row(5, d)) >= 10
  with pytest.raises(ValueError, match="arm=baseline"):
    module.get_config("fig=5,n=0,arm=related")
  # Points the target cannot supply on the release (06 holds ood_train samples) leave the sweep.
  medmat = module.get_sweep(f"{MEDMAT},ood_train=1000,figs=6,directions=area")
  assert sorted({int(common.parse_entry(a)["n"]) for a in medmat}) == [0, 500, 1000]


def test_medmat_counts_come_from_the_manifest(tmp_path):
  subsets = {f"{s:02d}": {"splits": {"train": {"count": 3000 if s != 28 else 1800, "shards": []},
                                     "test": {"count": 100, "shards": []}}} for s in mat.CLASSIFICATION_SUBSETS}
  manifest = {"medcg_manifest": 1, "format": "tfrecord", "image_size": 336, "subsets": subsets}
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  c = _module("cg_table3").get_config(f"row=15,data=medmat,shards={tmp_path}")
  assert c.data.mixture == [(4, "train", 3000), (28, "train", 1800)]
  assert "manifest.json" in c.experiment.data_counts
  # A partial conversion: the related arm needs only its two subsets; Baseline+ fails naming the manifest.
  manifest["subsets"] = {k: v for k, v in subsets.items() if k in ("03", "04", "28")}
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  c = _module("cg_table3").get_config(f"row=15,data=medmat,shards={tmp_path}")
  assert c.data.mixture == [(4, "train", 3000), (28, "train", 1800)]
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/manifest.json")):
    _module("cg_table3").get_config(f"row=15,arm=baseline_plus,data=medmat,shards={tmp_path}")


def test_sweep_subsets_and_pass_through():
  t3 = _module("cg_table3")
  assert t3.get_sweep("rows=15+2,seeds=2")[:3] == ["row=2,arm=baseline,seed=0", "row=2,arm=baseline,seed=1",
                                                   "row=2,arm=baseline_plus,seed=0"]
  assert len(t3.get_sweep()) == 43 * 3
  assert t3.get_sweep("rows=1-3,data=medmat,hf=/w")[0] == "row=1,arm=baseline,seed=0,data=medmat,hf=/w"
  assert _module("demo").get_sweep() == ["arm=baseline,seed=0", "arm=baseline_plus,seed=0", "arm=related,seed=0"]
  assert len(_module("cross_backbone").get_sweep()) == 8 * 2 * 3
  assert len(_module("scaling").get_sweep()) == 2 * 7
  with pytest.raises(ValueError, match="rows"):
    t3.get_sweep("rows=3-1")


def test_demo_is_table3_row_25():
  c = _module("demo").get_config("arm=related")
  assert c.experiment.row == 25 and c.experiment.target == 3
  assert c.data.mixture == [(5, "train", 600), (28, "train", 600)]


def test_sweep_print_for_a_pod(_fake_gcs_server, capsys):
  from experiments import sweep
  root = "gs://medcg-none/runs"  # a pod's workdirs are on a store every host sees; the done check looks there
  argv = ["--config", "configs/cg_table3.py", "--launcher", "print", "--tpu", "NAME", "--zone", "Z", "--root", root,
          "--repo-dir", "/home/me/medcg"]
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    assert sweep.main(argv) == 0
  finally:
    os.chdir(cwd)
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 43 * 3

  def expected(arg):
    remote = (f"cd /home/me/medcg && MEDCG_DISTRIBUTED=1 .venv/bin/python -m medcg.train "
              f"--config=configs/cg_table3.py:{arg} --workdir={root}/cg_table3/{arg.replace(',', '__')}")
    return shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "NAME", "--zone=Z", "--worker=all",
                       f"--command={remote}"])

  assert lines[0] == expected("row=1,arm=baseline,seed=0")
  assert lines[0] == (f"gcloud compute tpus tpu-vm ssh NAME --zone=Z --worker=all '--command=cd /home/me/medcg && "
                      f"MEDCG_DISTRIBUTED=1 .venv/bin/python -m medcg.train "
                      f"--config=configs/cg_table3.py:row=1,arm=baseline,seed=0 "
                      f"--workdir={root}/cg_table3/row=1__arm=baseline__seed=0'")
  assert lines[-1] == expected("row=43,arm=related,seed=0")
  assert [shlex.split(line)[-1].split(":", 1)[1].split(" ")[0] for line in lines] == \
      _module("cg_table3").get_sweep()


def _fake_results(accuracies: dict[int, float]) -> dict:
  per_subset = {f"{s:02d}": {"n": 60, "correct": round(60 * a), "accuracy": a} for s, a in accuracies.items()}
  n = 60 * len(accuracies)
  correct = sum(v["correct"] for v in per_subset.values())
  return {"overall": {"n": n, "correct": correct, "accuracy": correct / n}, "per_subset": per_subset}


def _check_table(markdown: str) -> list[list[str]]:
  """Every line of every table has the header's column count; returns the body rows (all tables)."""
  body = []
  for block in re.split(r"\n\s*\n", markdown.strip()):
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    if not lines:
      continue
    width = lines[0].count(" | ") + 1
    assert re.fullmatch(r"\|(---\|)+", lines[1]), block
    assert lines[1].count("---") == width
    for ln in lines[2:]:
      assert ln.startswith("| ") and ln.endswith(" |")
      cells = [c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]]
      assert len(cells) == width, ln
      body.append(cells)
  return body


@pytest.mark.parametrize("name", MODULES)
def test_collect_renders_tables(name):
  seed = random.randrange(1 << 30)
  rng = random.Random(seed)
  module = _module(name)
  results = {}
  for arg, c in _built(name, None):
    accs = {mat.get(s).id: rng.choice([0.25, 0.5, 0.75, 1.0]) for s, _, _ in c.data.eval_mixture}
    if c.experiment.get("arm") == "related" and "target" in c.experiment:
      accs[c.experiment.target] = 0.9  # a marker value to find in the table
    results[arg] = _fake_results(accs)
  out = module.collect(results)
  body = _check_table(out["markdown"])
  assert body, f"seed {seed}: no table rows"
  assert len(body) == EXPECTED_ROWS[name], f"seed {seed}"
  if name in CG_MODULES:
    assert any("90.0" in cell for row in body for cell in row), f"seed {seed}"
  import matplotlib.pyplot as plt
  figures = out.get("figures", {})
  assert bool(figures) == (name in FIGURE_MODULES), sorted(figures)
  for make in figures.values():  # each builds a titled figure from these results
    fig = make()
    assert fig.axes and (fig.axes[0].get_title() or fig._suptitle.get_text())
    plt.close(fig)


FIGURE_MODULES = ("cg_table3", "cg_three_source", "scaling", "multitask", "demo", "limited_data")
EXPECTED_ROWS = {"cg_table3": 43, "cg_three_source": 9, "scaling": 14, "multitask": 37, "cross_backbone": 8,
                 "demo": 1, "limited_data": 16, "cls_det": 10}


def test_collect_means_over_seeds():
  runs = {f"row=15,arm={arm},seed={s}": _fake_results({3: acc}) for arm, accs in
          (("baseline", (0.5, 0.5)), ("baseline_plus", (0.4, 0.6)), ("related", (0.8, 0.9))) for s, acc in
          enumerate(accs)}
  body = _check_table(_module("cg_table3").collect(runs)["markdown"])
  assert body[0][0] == "15" and body[0][3:7] == ["60", "50.0 ± 0.0 (seeds 0,1)", "50.0 ± 14.1 (seeds 0,1)",
                                                 "85.0 ± 7.1 (seeds 0,1)"]
  # counts only (no per-sample outcomes): the unpaired bootstrap, and the table says so
  assert body[0][7].startswith("+35.0 [+") and body[0][8] == "**helps** (p<0.0001, unpaired)"
  assert body[0][9] == "47 / 46 / 72"
  scaling = _module("scaling").collect({"target=3,setting=all_related,seed=0": _fake_results({3: 0.7})})["markdown"]
  assert "| All Related | 60 | 70.0 [57.5, 80.1] | – | – | 73 |" in scaling
  multi = _module("multitask").collect({"arm=multi,seed=0": _fake_results({3: 0.9, 5: 0.4})})["markdown"]
  assert "| 03 | CT Lung COVID | ID | 60 | 90.0 [79.9, 95.3] | 47 | 49 | 89 |" in multi


def test_colab_notebook_is_valid():
  path = os.path.join(REPO, "experiments", "colab_tpu.ipynb")
  with open(path, encoding="utf-8") as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 4 and isinstance(nb["metadata"], dict)
  assert nb["metadata"]["accelerator"] == "TPU"
  code = []
  for i, cell in enumerate(nb["cells"]):
    assert cell["cell_type"] in ("markdown", "code"), i
    assert isinstance(cell["source"], list) and all(isinstance(s, str) for s in cell["source"]), i
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None and "metadata" in cell, i
      src = "".join(cell["source"])
      # Shell (!) and magic (%) lines are IPython; the rest must be valid Python.
      py = "\n".join("pass" if ln.lstrip().startswith(("!", "%")) else ln for ln in src.splitlines())
      compile(py, f"cell {i}", "exec")
      code.append(src)
  text = "\n".join(code)
  for needle in ("pip install -q -r requirements.txt", "jax.devices()", "python -m medcg.data synth",
                 "python -m medcg.data convert", "python -m medcg.train --config configs/demo.py:arm=related",
                 "sweep.collect"):
    assert needle in text, needle
  # The notebook's SynthMAT sizes are the ones the configs plan with.
  assert f"--per_subset {common.SYNTH_TRAIN}" in text and f"--test_per_subset {common.SYNTH_TEST}" in text
  assert f"--image_size {common.SYNTH_IMAGE_SIZE}" in text


def test_sweep_collect_writes_the_table_and_every_run(tmp_path, capsys):
  from experiments import sweep
  config = os.path.join(REPO, "configs", "demo.py") + ":seeds=2"
  accs = {("baseline", 0): 0.5, ("baseline", 1): 0.45, ("baseline_plus", 0): 0.5, ("related", 0): 0.9,
          ("related", 1): 0.8}
  for arg in sweep.sweep_args(config):
    parsed = common.parse_entry(arg)
    key = (parsed["arm"], int(parsed["seed"]))
    if key in accs:  # baseline_plus seed 1 is unfinished: left out, not an error
      workdir = sweep.workdir_for(str(tmp_path / "runs"), config, arg)
      os.makedirs(workdir)
      with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(_fake_results({3: accs[key]}), f)
  out = tmp_path / "tables" / "demo"
  assert sweep.main(["--config", config, "--root", str(tmp_path / "runs"), "--collect", "--out", str(out)]) == 0
  markdown = (tmp_path / "tables" / "demo.md").read_text()
  saved = json.loads((tmp_path / "tables" / "demo.json").read_text())
  printed = capsys.readouterr()
  assert saved["markdown"].strip() in printed.out and "85.0" in markdown   # Related: mean of 90 and 80
  assert markdown.startswith(saved["markdown"].strip()) and len(saved["runs"]) == len(accs)
  assert saved["runs"]["arm=related,seed=1"]["overall"]["accuracy"] == pytest.approx(0.8, abs=0.01)
  assert saved["decisions"]["25"]["verdict"] == "helps" and saved["decisions"]["25"]["test"] == "unpaired bootstrap"
  # the Table 3 plot beside the table, linked from it, as PNG and SVG
  png = tmp_path / "tables" / "demo_table3.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.with_suffix(".svg").stat().st_size > 0
  assert "![table3](demo_table3.png)" in markdown and f"wrote {png}" in printed.err
  # --from re-lays out the committed table without the workdirs
  again = tmp_path / "again"
  assert sweep.main(["--config", config, "--collect", "--from", str(out) + ".json", "--out", str(again)]) == 0
  assert json.loads((tmp_path / "again.json").read_text())["markdown"] == saved["markdown"]
  with pytest.raises(SystemExit):
    sweep.main(["--config", config, "--from", str(out) + ".json"])


QWEN_BASES = {"synth": "model=tiny-qwen2vl", "medmat": f"data=medmat,model=qwen2-vl-7b,shards={NO_SHARDS}"}


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("kind", ["synth", "medmat"])
def test_every_experiment_config_takes_a_qwen_preset(name, kind):
  base = QWEN_BASES[kind] + (",backbone=qwen2-vl" if name == "cross_backbone" else "")
  module = _module(name)
  for arg in module.get_sweep(base)[:6]:
    c = module.get_config(arg)
    assert c.model.family == "qwen2_vl" and not c.trim.enabled, arg
    if kind == "synth":  # from scratch: the corpus tokenizer, the preset's 112 px grid, its own shards
      assert (c.data.image_size, c.data.num_image_tokens, c.data.chat_template) == (112, 16, "plain"), arg
      assert c.data.shards_dir == common.synth_dirs("tiny-qwen2vl")[1] == "data/synthmat112_shards", arg
      assert c.train.lr == common.SYNTH_LR and c.train.freeze == (), arg
    else:  # the paper's Qwen2-VL recipe
      assert (c.data.image_size, c.data.num_image_tokens, c.data.chat_template) == (448, 256, "qwen2_vl"), arg
      assert c.train.lr == 2e-6 and c.data.batch_size == 32 and c.train.freeze == common.FROZEN_TOWERS, arg
      assert c.model.llm.mrope_section == [16, 24, 24] and c.model.llm.hidden_size == 3584, arg


def test_qwen_cross_backbone_recipe_and_freeze():
  import jax
  from flax import nnx
  from configs import models
  from medcg.model import vlm
  from medcg.train import optimizer
  c = _module("cross_backbone").get_config(f"backbone=qwen2-vl,data=medmat,model=qwen2-vl-7b,hf=/ckpt/qwen,"
                                           f"shards={NO_SHARDS}")
  assert (c.train.lr, c.train.epochs, c.data.batch_size) == (2e-6, 5, 32)
  assert c.train.init_from_hf == "/ckpt/qwen" and c.data.tokenizer.kind == "qwen"
  assert c.data.tokenizer.path == "/ckpt/qwen/tokenizer.json" and c.data.chat_template == "qwen2_vl"
  assert _module("cross_backbone").get_config("backbone=qwen2-vl,data=medmat,model=qwen2-vl-7b,hw=v5p-8,"
                                              f"shards={NO_SHARDS}").mesh.fsdp == 4
  # The pretrained recipe's freeze leaves the merger and the decoder trained, the Qwen ViT frozen.
  model = nnx.eval_shape(lambda: vlm.build(models.get("tiny-qwen2vl"), rngs=nnx.Rngs(0)))
  optimizer.check_patterns_match(nnx.state(model, nnx.Param), common.FROZEN_TOWERS, "freeze")
  is_frozen = optimizer.frozen_filter(common.FROZEN_TOWERS)
  frozen = {optimizer.param_path(p).split("/")[0]
            for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, is_frozen))}
  trained = {optimizer.param_path(p).split("/")[0]
             for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.All(nnx.Param, nnx.Not(is_frozen))))}
  assert frozen == {"vision"} and trained == {"merger", "llm"}


def test_qwen_presets_build_with_their_published_sizes():
  import jax
  from flax import nnx
  from configs import models
  from medcg.model import vlm
  counts = {}
  for name in ("qwen2-vl-7b", "qwen2.5-vl-3b", "qwen2.5-vl-7b"):
    model = nnx.eval_shape(lambda: vlm.build(models.get(name), rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    counts[name] = {part: sum(int(x.size) for x in jax.tree.leaves(state[part])) for part in ("vision", "merger", "llm")}
  # Published totals: Qwen2-VL-7B 8.29B, Qwen2.5-VL-7B 8.29B, Qwen2.5-VL-3B 3.75B parameters.
  for name, total in (("qwen2-vl-7b", 8.29e9), ("qwen2.5-vl-7b", 8.29e9), ("qwen2.5-vl-3b", 3.75e9)):
    assert abs(sum(counts[name].values()) - total) / total < 0.01, (name, counts[name])
  assert abs(counts["qwen2-vl-7b"]["vision"] - 0.631e9) / 0.631e9 < 0.02, counts  # 675M with the merger


def test_fit_config_is_table3_row15_with_one_recipe():
  fit = _module("fit")
  c = fit.get_config("llava-1.5-7b@h200x1")
  assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.train.accum_steps) == (1, 1, 1, 8)
  assert c.hardware.target == "h200x1" and c.hardware.env.XLA_PYTHON_CLIENT_MEM_FRACTION == "0.95"
  assert c.experiment.row == 15
  with pytest.raises(ValueError, match="no fit recipe for llava-1.5-7b on v9-1"):
    fit.get_config("llava-1.5-7b@v9-1")
  with pytest.raises(ValueError, match="use hw=v5e-32"):  # the compiler showed it cannot fit
    fit.get_config("llava-1.5-13b@v5e-16")
  assert fit.get_config("llava-1.5-13b@v5e-16", allow_misses=True).mesh.fsdp == 16  # experiments/aot_fit
