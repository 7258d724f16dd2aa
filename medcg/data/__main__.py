"""Command line for Med-MAT data: `python -m medcg.data {synth,convert,inspect} ...`.

  python -m medcg.data synth --out /data/synthmat --image_size 64 --per_subset 200 [--detection]
  python -m medcg.data convert --src /data/synthmat --out /data/medmat_shards --image_size 64
  python -m medcg.data inspect /data/medmat_shards [--json | --wide] [--verify]
  python -m medcg.data tokenizer /data/medmat_shards --vocab_size 512   (BPE for from-scratch models)

`convert --out`, `inspect` and `tokenizer` also take `gs://bucket/prefix` (`convert` builds in a local
`--staging` directory and uploads, manifest.json last); `convert --src` and `synth --out` are local only.

A bad flag, path or source file prints one line `medcg.data: error: ...` and exits 2; `--verbose` or
MEDCG_VERBOSE=1 adds its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Any, Sequence

from medcg import fileio
from medcg import mat
from medcg.data import features as features_lib
from medcg.data import shards as shards_lib
from medcg import errors
from medcg.errors import UserError


def _subset_list(text: str) -> list[int]:
  try:
    return [mat.get(part).id for part in text.split(",") if part.strip()]
  except KeyError as e:
    raise argparse.ArgumentTypeError(str(e.args[0])) from e


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
  return value


def summary(manifest: shards_lib.Manifest, with_example: bool = True) -> dict[str, Any]:
  """A JSON-able summary of a converted dataset (no shard offsets), plus one decoded example."""
  out: dict[str, Any] = {key: manifest.data.get(key) for key in
                         ("format", "image_size", "shard_size", "on_error", "medcg_version", "source_root")}
  out["root"] = str(manifest.root)
  out["subsets"] = {}
  for key, sub in manifest.data["subsets"].items():
    out["subsets"][key] = {
        "triplet": sub["triplet"],
        "splits": {split: {"count": info["count"], "labels": info["labels"], "skipped": len(info.get("skipped", [])),
                           "shards": len(info["shards"])}
                   for split, info in sub["splits"].items()}}
  if with_example:
    for split in ("train", "test"):
      ids = manifest.subsets(split)
      if ids:
        src = shards_lib.subset_source(manifest, ids[0], split)
        ex = features_lib.parse_example(src[0], where=f"subset {ids[0]:02d} {split} record 0")
        image = features_lib.decode_image(ex.pop("image"))
        ex["image_shape"] = list(image.shape)
        ex["image_dtype"] = str(image.dtype)
        out["example"] = ex
        break
  return out


NARROW = 80  # columns of the default table (`--wide`: as wide as the terminal, nothing cut)


def format_labels(labels: dict[str, int]) -> str:
  """`"Normal": 12, "Mild, moderate": 3`: quoted, since a label may itself hold commas or colons."""
  return ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {v}" for k, v in labels.items())


def _print_table(info: dict[str, Any], wide: bool = False) -> None:
  """The summary as tables. By default each line fits 80 columns: short headers, no column rules, the skipped
  column only when something was skipped, labels cut to the room left ("…"); `--wide` shows every cell whole."""
  from rich import box
  from rich.console import Console
  from rich.measure import Measurement
  from rich.table import Table
  rows = []
  for key, sub in info["subsets"].items():
    splits = sub["splits"]
    labels = (splits.get("train") or splits.get("test") or {}).get("labels", {})
    rows.append([key, *sub["triplet"], *(str(splits[s]["count"]) if s in splits else "-" for s in ("train", "test")),
                 str(sum(s["skipped"] for s in splits.values())), format_labels(labels)])
  title = f"Med-MAT shards at {info['root']} ({info['format']}, {info['image_size']} px)"
  console = Console() if wide else Console(width=NARROW)
  if wide:
    table = Table(title=title)
    for col in ("subset", "modality", "area", "task", "train", "test", "skipped", "labels (train or test)"):
      table.add_column(col)
    for row in rows:
      table.add_row(*row)
  else:
    headers = ["id", "modality", "area", "task", "train", "test", "skipped"]
    if all(r[6] == "0" for r in rows):  # the usual case: no column of zeros
      del headers[6]
      for r in rows:
        del r[6]

    def narrow(labels: list[str]) -> Table:
      t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1),
                collapse_padding=True)
      for i, col in enumerate(headers):
        t.add_column(col, no_wrap=True, justify="right" if i >= 4 else "left")
      t.add_column("labels (train or test)", no_wrap=True)
      for row, cell in zip(rows, labels):
        t.add_row(*row[:-1], cell)
      return t

    # The labels are cut here, to the width the other columns leave: given a table wider than the console,
    # rich would shrink every column instead, ids and counts included.
    bare = Measurement.get(console, console.options, narrow([""] * len(rows))).maximum
    room = max(NARROW - bare + len("labels (train or test)"), 16)
    table = narrow([r[-1] if len(r[-1]) <= room else r[-1][:room - 1] + "…" for r in rows])
  console.print(table)
  if "example" in info:
    ex = Table(title="one decoded example")
    ex.add_column("field", no_wrap=True)
    ex.add_column("value")  # long values wrap (within 80 columns by default): nothing is lost
    for k, v in info["example"].items():
      ex.add_row(k, str(v))
    console.print(ex)


def _write_quietly(write) -> int:
  """Runs `write()` (printing to stdout); a reader that hangs up early (`| head`) ends it without a traceback.

  The usual treatment of a closed pipe: stdout goes to /dev/null (so the interpreter's last flush cannot fail
  again) and the exit status is 141, what a shell reports for a command killed by SIGPIPE.
  """
  try:
    write()
    sys.stdout.flush()  # here, not at exit: a closed pipe must show up inside the try
  except BrokenPipeError:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141
  return 0


def corpus_texts(root: str):
  """Every prompt and answer text of a converted dataset (Med-MAT Question-choice + answer letters)."""
  from medcg.data import prompt as prompt_lib
  manifest = shards_lib.Manifest.load(root)
  for split in shards_lib.SPLITS:
    for subset in manifest.subsets(split):
      src = shards_lib.subset_source(manifest, subset, split)
      for i in range(len(src)):
        ex = features_lib.parse_example(src[i], where=f"subset {subset:02d} {split} record {i}")
        yield prompt_lib.question_choice(ex["question"], ex["options"]) + "\nAnswer: " + ex["answer"]


def build_corpus_tokenizer(root: str, vocab_size: int, out: str | None = None) -> str:
  """Train (or reuse) DIR/tokenizer-bpe<V>.json on the dataset's prompts; returns its path (local or gs://)."""
  from medcg.data import tokenizer as tok_lib
  out = out or fileio.join(root, f"tokenizer-bpe{vocab_size}.json")
  tok_lib.train_corpus_tokenizer(corpus_texts(root), vocab_size, out)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = errors.ArgumentParser(prog="python -m medcg.data", description=__doc__)  # defaults in --help
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("synth", help="write SynthMAT (release layout, schema A JSON + PNGs)")
  p.add_argument("--out", required=True)
  p.add_argument("--image_size", type=_positive, default=64)
  p.add_argument("--per_subset", type=_positive, default=300, help="train samples per subset")
  p.add_argument("--test_per_subset", type=int, default=60,
                 help="test samples per subset (rounded down to a multiple of the label count)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--subsets", type=_subset_list, default=None,
                 help="comma-separated ids (default: 1-37); detection ids 38-50 are allowed")
  p.add_argument("--detection", action="store_true",
                 help="also write the detection subsets 38-50 (one object per image, its box as the answer)")

  p = sub.add_parser("convert", help="convert a Med-MAT root into TFDS shards + manifest.json")
  p.add_argument("--src", required=True, help="Med-MAT root (real release or SynthMAT)")
  p.add_argument("--out", required=True)
  p.add_argument("--shard_size", type=_positive, default=1024, help="records per shard")
  p.add_argument("--image_size", type=_positive, default=336, help="square image side in pixels")
  p.add_argument("--format", choices=shards_lib.FORMATS, default="tfrecord")
  p.add_argument("--on_error", choices=("fail", "skip"), default="fail")
  p.add_argument("--subsets", type=_subset_list, default=None, help="comma-separated ids (default: all found)")
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--staging", default=None,
                 help="gs:// --out only: the local directory the shards are built in before the upload (default: "
                      "one under the system temp dir named by a hash of --out, so a re-run resumes there)")

  p = sub.add_parser("inspect", help="print the manifest summary and one decoded example")
  p.add_argument("dir")
  p.add_argument("--json", action="store_true", help="print JSON instead of tables")
  p.add_argument("--wide", action="store_true",
                 help="print the full tables (as wide as the terminal) instead of cells cut to fit 80 columns")
  p.add_argument("--verify", action="store_true",
                 help="also check every shard's sha256 and record count against the manifest")

  p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer.json on the shards' prompts")
  p.add_argument("dir", help="a converted shards root")
  p.add_argument("--vocab_size", type=_positive, default=512)
  p.add_argument("--out", default=None, help="default: DIR/tokenizer-bpe<V>.json")

  args = parser.parse_args(argv)
  if args.command == "tokenizer":
    out = build_corpus_tokenizer(args.dir, args.vocab_size, args.out)
    print(f"wrote {out}")
  elif args.command == "synth":
    if fileio.is_remote(args.out):
      raise UserError(f"--out {args.out}: synth writes to a local directory only (convert reads a local --src)")
    from medcg.data import synth  # the SynthMAT generator
    synth.write_synthmat(args.out, image_size=args.image_size, per_subset=args.per_subset,
                         test_per_subset=args.test_per_subset, seed=args.seed, subsets=args.subsets,
                         progress=not args.no_progress, detection=args.detection)
    print(f"wrote SynthMAT to {args.out}")
  elif args.command == "convert":
    if not errors.verbose(argv):
      # TensorFlow's C++ INFO lines (oneDNN, CPU features) say nothing to act on. TF only writes TFRecord
      # files here (no float math), so oneDNN's kernels are not wanted either; its notice ignores the level.
      os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
      os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    from medcg.data import tfds_builder  # imports tfds (and TensorFlow when writing TFRecord)
    kwargs = dict(subsets=args.subsets, image_size=args.image_size, shard_size=args.shard_size, fmt=args.format,
                  on_error=args.on_error, progress=not args.no_progress)
    uploaded = None
    if fileio.is_remote(args.out):
      manifest, uploaded = tfds_builder.convert_remote(args.src, args.out, staging=args.staging, **kwargs)
    else:
      manifest = tfds_builder.convert(args.src, args.out, **kwargs)
    n = {split: sum(manifest.count(s, split) for s in manifest.subsets(split)) for split in shards_lib.SPLITS}
    print(f"converted {len(manifest.data['subsets'])} subsets to {args.out}: "
          + ", ".join(f"{k} {v}" for k, v in n.items())
          + ("" if uploaded is None else f" ({len(uploaded)} files uploaded)"))
  else:
    manifest = shards_lib.Manifest.load(args.dir)
    verified = manifest.verify() if args.verify else None
    info = summary(manifest)

    def write() -> None:
      if args.json:
        json.dump(info, sys.stdout, indent=1, ensure_ascii=False)
        print()
      else:
        _print_table(info, wide=args.wide)
      if verified is not None:  # stderr under --json, so stdout stays one JSON document
        line = (f"verified {verified['subsets']:,} subsets, {verified['records']:,} records, "
                f"{verified['shards']:,} shards: sha256 and record counts match the manifest")
        print(line if args.wide else textwrap.fill(line, NARROW, subsequent_indent="  "),
              file=sys.stderr if args.json else sys.stdout)
    return _write_quietly(write)
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except Exception as e:  # the user's mistake (flags, paths, storage): one line, no traceback
    status = errors.exit_status(e, "medcg.data")
    if status is None:
      raise
    sys.exit(status)
