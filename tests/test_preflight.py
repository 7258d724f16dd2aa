"""medcg.preflight: the data check before anything runs names what is missing and the commands that build it."""
import json
import os
import time

import pytest

from configs import cg_table3
from configs import demo as demo_cfg
from medcg import errors
from medcg import fileio
from medcg import preflight

ARMS = ("arm=baseline,seed=0", "arm=baseline_plus,seed=0", "arm=related,seed=0")


def _manifest_copy(synth_shards, dest, edit=None, tokenizer=True):
  """The fixture's manifest alone in `dest` (the check reads nothing else), optionally edited."""
  os.makedirs(dest)
  with open(os.path.join(synth_shards, "manifest.json")) as f:
    data = json.load(f)
  if edit:
    edit(data)
  with open(os.path.join(dest, "manifest.json"), "w") as f:
    json.dump(data, f)
  if tokenizer:
    open(os.path.join(dest, "tokenizer-bpe512.json"), "w").close()
  return str(dest)


def _demo(arm, shards, **args):
  extra = "".join(f",{k}={v}" for k, v in args.items())
  return demo_cfg.get_config(f"{arm},shards={shards}{extra}")


def test_ready_data_passes_in_well_under_a_second(synth_shards, tmp_path):
  shards = _manifest_copy(synth_shards, tmp_path / "shards")
  configs = {arm: _demo(arm, shards, synth_train=24) for arm in ("arm=baseline,seed=0", "arm=related,seed=0")}
  t = time.perf_counter()
  preflight.check_all(configs)
  preflight.check_data(configs["arm=related,seed=0"], what="arm=related,seed=0")
  assert time.perf_counter() - t < 0.5


def test_undersized_shards_name_subset_split_counts_and_the_commands(synth_shards):
  with pytest.raises(preflight.DataNotReady) as e:
    preflight.check_data(_demo("arm=related,seed=0", synth_shards), what="arm=related,seed=0", tokenizer=False)
  text = str(e.value)
  assert text.startswith("data not ready for arm=related,seed=0: subset 05 split 'train': 600 needed "
                         f"(data.mixture[0]), 24 available in {synth_shards}")
  assert f"subset 28 split 'train': 600 needed (data.mixture[1]), 24 available in {synth_shards}" in text
  with open(os.path.join(synth_shards, "manifest.json")) as f:
    src = json.load(f)["source_root"]  # where the shards came from: rebuilt in place
  lines = [line.strip() for line in text.splitlines()]
  assert f"python -m medcg.data synth --out {src} --image_size 32 --per_subset 600 --test_per_subset 60" in lines
  # The same format as the existing shards, so convert keeps what it can.
  assert (f"python -m medcg.data convert --src {src} --out {synth_shards} --image_size 32 "
          "--format array_record") in lines
  assert not any("medcg.data tokenizer" in line for line in lines)  # tokenizer=False: not checked


def test_missing_shards_dir_gives_all_three_commands(tmp_path):
  shards = str(tmp_path / "data" / "synthmat_shards")
  with pytest.raises(preflight.DataNotReady) as e:
    preflight.check_data(_demo("arm=related,seed=0", shards))
  lines = str(e.value).splitlines()
  assert lines[0] == f"data not ready: {shards}: no such directory (config data.shards_dir)"
  raw = str(tmp_path / "data" / "synthmat")
  assert [line.strip() for line in lines[1:]] == [
      "build it with:",
      f"python -m medcg.data synth --out {raw} --image_size 32 --per_subset 600 --test_per_subset 60",
      f"python -m medcg.data convert --src {raw} --out {shards} --image_size 32",
      f"python -m medcg.data tokenizer {shards} --vocab_size 512"]


def test_check_all_reports_every_arm_at_once(synth_shards):
  configs = {arm: _demo(arm, synth_shards) for arm in ARMS}
  with pytest.raises(preflight.DataNotReady) as e:
    preflight.check_all(configs, tokenizer=False)
  text = str(e.value)
  assert text.startswith("data not ready for 2 of 3 runs: ")  # the baseline only evaluates on 03's test split
  assert "subset 05 split 'train': 600 needed (data.mixture[0]), 24 available" in text
  assert "[arm=related,seed=0]" in text
  # Baseline+'s unrelated subsets are not in the shards at all: one line for them, naming each.
  absent = [line for line in text.splitlines() if "not in" in line]
  assert len(absent) == 1 and "subsets 07, 08, 11" in absent[0] and "split 'train'" in absent[0]
  assert "it holds subsets 03, 05, 28" in absent[0] and absent[0].endswith("[arm=baseline_plus,seed=0]")
  assert sum("medcg.data synth" in line for line in text.splitlines()) == 1  # one rebuild for the shared dir


def test_image_size_and_tokenizer(synth_shards, tmp_path):
  def to_64(data):
    data["image_size"] = 64
  shards = _manifest_copy(synth_shards, tmp_path / "s64", edit=to_64, tokenizer=False)
  with pytest.raises(preflight.DataNotReady) as e:
    preflight.check_data(_demo("arm=related,seed=0", shards, synth_train=24))
  text = str(e.value)
  assert f"{shards}/manifest.json: the shards are 64 px, config data.image_size is 32" in text
  assert f"config data.tokenizer.path (hf tokenizer) {shards}/tokenizer-bpe512.json: no such file" in text
  assert "--image_size 32" in text and f"python -m medcg.data tokenizer {shards} --vocab_size 512" in text
  # Only the tokenizer missing: only its command.
  shards = _manifest_copy(synth_shards, tmp_path / "s32", tokenizer=False)
  with pytest.raises(preflight.DataNotReady) as e:
    preflight.check_data(_demo("arm=related,seed=0", shards, synth_train=24))
  commands = [line.strip() for line in str(e.value).splitlines() if line.startswith("  python")]
  assert commands == [f"python -m medcg.data tokenizer {shards} --vocab_size 512"]


def test_real_medmat_gets_convert_and_no_synth(synth_shards, tmp_path):
  shards = _manifest_copy(synth_shards, tmp_path / "medmat_shards")
  c = cg_table3.get_config(f"row=25,arm=related,data=medmat,model=tiny,shards={shards}")
  preflight.check_data(c)  # sized from the manifest: ready
  c.data.mixture = [(5, "train", 100), (28, "train", 24)]
  with pytest.raises(preflight.DataNotReady) as e:
    preflight.check_data(c)
  text = str(e.value)
  assert "subset 05 split 'train': 100 needed (data.mixture[0]), 24 available" in text and "subset 28" not in text
  with open(os.path.join(synth_shards, "manifest.json")) as f:
    source_root = json.load(f)["source_root"]
  commands = [line.strip() for line in text.splitlines() if line.startswith("  python")]
  assert commands == [f"python -m medcg.data convert --src {source_root} --out {shards} --image_size 32 "
                      "--format array_record"]
  # A tokenizer that is not a medcg corpus tokenizer (an hf= checkpoint's) has no build command.
  c.data.mixture = [(5, "train", 24)]
  c.data.tokenizer.path = str(tmp_path / "ckpt" / "tokenizer.json")
  with pytest.raises(preflight.DataNotReady, match=r"ckpt/tokenizer.json: no such file \(not a medcg corpus"):
    preflight.check_data(c)


def test_bad_mixture_entries_name_the_key(synth_shards):
  c = _demo("arm=related,seed=0", synth_shards, synth_train=24)
  c.data.eval_mixture = []  # a run without evaluation reads nothing there
  preflight.check_data(c, tokenizer=False)
  c.data.eval_mixture = [(3, "test", 0)]
  with pytest.raises(errors.ConfigError, match=r"config data.eval_mixture\[0\]=.*n_samples must be"):
    preflight.check_data(c, tokenizer=False)
  c.data.eval_mixture = [(3, "test", 13)]  # the fixture's test split holds 12
  with pytest.raises(preflight.DataNotReady, match=r"subset 03 split 'test': 13 needed \(data.eval_mixture\[0\]\), "
                                                   r"12 available"):
    preflight.check_data(c, tokenizer=False)


def test_remote_shards_dir(gcs_root, synth_shards):
  shards = f"{gcs_root}/synthmat_shards"
  configs = {arm: _demo(arm, shards) for arm in ARMS}
  with pytest.raises(preflight.DataNotReady) as e:
    preflight.check_all(configs)
  text = str(e.value)
  assert text.splitlines()[0] == f"data not ready for 3 of 3 runs: {shards}: no such directory (config data.shards_dir)"
  assert f"python -m medcg.data convert --src {gcs_root}/synthmat --out {shards} --image_size 32" in text
  # A manifest on the store is read like a local one (the shards themselves are not opened).
  fileio.copy_file(os.path.join(synth_shards, "manifest.json"), f"{shards}/manifest.json")
  fileio.atomic_write_text(f"{shards}/tokenizer-bpe512.json", "{}")
  preflight.check_data(_demo("arm=related,seed=0", shards, synth_train=24))
  with pytest.raises(preflight.DataNotReady, match=f"subset 05 split 'train': 600 needed .*24 available in {shards}"):
    preflight.check_data(_demo("arm=related,seed=0", shards))
  # A pod launcher checks remote paths only: local shards are the workers'.
  preflight.check_all({arm: _demo(arm, "/nonexistent/shards") for arm in ARMS}, check_local=False)
