"""Issue 15 item 4: file modes of atomic writes, byte-stable conversions, no temp dirs left, `inspect` output."""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from medcg import fileio
from medcg.data import __main__ as cli
from medcg.data import shards

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
  return dict(os.environ, PYTHONPATH=str(REPO))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
  old = os.umask(umask)
  try:
    fileio.atomic_write_json(tmp_path / "config.json", {"a": 1})
    fileio.atomic_write_text(tmp_path / "run.json", "{}")
    fileio.atomic_write_text(tmp_path / "run.json", "{}\n")  # an overwrite, too
    fileio.atomic_write_bytes(tmp_path / "results.bin", b"x")
    fileio.copy_file(tmp_path / "results.bin", tmp_path / "copy.bin")
    with open(tmp_path / "plain.txt", "w") as f:  # what they must match
      f.write("x")
  finally:
    os.umask(old)
  for name in ("config.json", "run.json", "results.bin", "copy.bin", "plain.txt"):
    assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name
  assert sorted(os.listdir(tmp_path)) == ["config.json", "copy.bin", "plain.txt", "results.bin", "run.json"]


def _shard_digests(root: Path) -> dict[str, str]:
  m = shards.Manifest.load(root)
  out = {}
  for key in m.data["subsets"]:
    for split in m.splits(key):
      for s in m.shards(key, split):
        out[os.path.relpath(s.path, root)] = s.sha256
        assert hashlib.sha256(Path(s.path).read_bytes()).hexdigest() == s.sha256
  return out


@pytest.mark.parametrize("fmt", ["array_record", "tfrecord"])
def test_two_conversions_of_one_source_are_byte_identical(tmp_path, fmt):
  """Each convert in its own process: protobuf's map order (what differed) changes between processes."""
  from medcg.data import synth
  synth.write_synthmat(tmp_path / "raw", image_size=16, per_subset=6, test_per_subset=4, seed=0, subsets=[3, 28],
                       progress=False)
  for out in ("a", "b"):
    r = subprocess.run([sys.executable, "-m", "medcg.data", "convert", "--src", str(tmp_path / "raw"),
                        "--out", str(tmp_path / out), "--image-size", "16", "--shard-size", "4", "--format", fmt,
                        "--no-progress"], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # Quiet: no tfds "Downloading and preparing ..." / "... downloaded and prepared" lines, no TF C++ INFO logs.
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"converted 2 subsets to {tmp_path / out}: train 12, test "), lines
  a, b = _shard_digests(tmp_path / "a"), _shard_digests(tmp_path / "b")
  assert a == b and len(a) >= 4  # at least 2 subsets x (train, test)
  for rel in a:
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_convert_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch):
  from medcg.data import synth, tfds_builder
  synth.write_synthmat(tmp_path / "raw", image_size=8, per_subset=4, test_per_subset=2, seed=0, subsets=[3, 5],
                       progress=False)
  private = tmp_path / "tmp"
  private.mkdir()
  monkeypatch.setenv("TMPDIR", str(private))
  monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
  assert tempfile.gettempdir() == str(private)
  before = sorted(os.listdir(private))
  tfds_builder.convert(tmp_path / "raw", tmp_path / "out", image_size=8, fmt="array_record", progress=False)
  assert sorted(os.listdir(private)) == before == []
  assert not (tmp_path / "out" / tfds_builder.TMP_DIR).exists()


# -- inspect ---------------------------------------------------------------------------------------------

def test_labels_are_quoted():
  assert cli.format_labels({"Normal": 3, "Mild, moderate": 2}) == '"Normal": 3, "Mild, moderate": 2'
  assert cli.format_labels({'say "ah"': 1}) == '"say \\"ah\\"": 1'


def test_inspect_fits_80_columns_and_wide_keeps_everything(synth_shards, capsys, monkeypatch):
  monkeypatch.setenv("COLUMNS", "300")  # the default table is 80 wide whatever the terminal
  manifest = shards.Manifest.load(synth_shards)
  labels = {k: manifest.labels(int(k), "train") for k in manifest.data["subsets"]}
  capsys.readouterr()
  assert cli.main(["inspect", synth_shards]) == 0
  out = capsys.readouterr().out
  assert max(len(line) for line in out.splitlines()) <= 80
  for hist in labels.values():
    assert f'"{sorted(hist)[0]}": ' in out  # the first label of each row, quoted
  assert cli.main(["inspect", synth_shards, "--wide"]) == 0
  wide = capsys.readouterr().out
  for hist in labels.values():
    assert cli.format_labels(hist) in wide  # whole, not cut


def test_inspect_verify_says_what_it_verified(synth_shards, capsys):
  m = shards.Manifest.load(synth_shards)
  n_records = sum(m.count(s, split) for s in m.subsets() for split in m.splits(s))
  n_shards = sum(len(m.shards(s, split)) for s in m.subsets() for split in m.splits(s))
  assert m.verify() == {"subsets": 3, "records": n_records, "shards": n_shards}
  capsys.readouterr()
  assert cli.main(["inspect", synth_shards, "--verify"]) == 0
  out = " ".join(capsys.readouterr().out.split())  # unwrapped
  assert (f"verified 3 subsets, {n_records:,} records, {n_shards:,} shards: sha256 and record counts match "
          "the manifest") in out
  assert cli.main(["inspect", synth_shards, "--verify", "--json"]) == 0
  captured = capsys.readouterr()
  json.loads(captured.out)  # stdout stays one JSON document; the line goes to stderr
  assert "verified 3 subsets" in captured.err


def test_inspect_verify_catches_a_wrong_record_count(synth_shards, tmp_path):
  import shutil
  root = tmp_path / "copy"
  shutil.copytree(synth_shards, root)
  data = json.loads((root / shards.MANIFEST).read_text())
  shard = data["subsets"]["03"]["splits"]["train"]["shards"][0]
  shard["count"] += 1
  (root / shards.MANIFEST).write_text(json.dumps(data))
  with pytest.raises(shards.ShardError, match=r"holds \d+ records, the manifest says"):
    shards.Manifest.load(root).verify()


def test_inspect_json_into_a_closed_pipe_is_quiet(synth_shards):
  # The reader is gone before inspect writes (deterministic, unlike `| head -c 10` racing a small output).
  read, write = os.pipe()
  os.close(read)
  try:
    r = subprocess.run([sys.executable, "-m", "medcg.data", "inspect", synth_shards, "--json"], stdout=write,
                       stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env(), timeout=300)
  finally:
    os.close(write)
  assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr[-2000:]
  assert r.returncode == 141
  # And through `head -c 10`, as a user would.
  r = subprocess.run(f"{sys.executable} -m medcg.data inspect {synth_shards} --json | head -c 10", shell=True,
                     capture_output=True, text=True, cwd=REPO, env=_env(), timeout=300)
  assert r.stdout == '{\n "format"'[:10] and "Traceback" not in r.stderr, r.stderr[-2000:]
