r"""SynthMAT contact sheet and factor-separability probes.

Writes a contact sheet (one row per subset, columns = labels x examples) and measures how well a
linear probe on raw pixels recovers the modality, the area and, within each subset, the label; prints
a table and saves it as JSON. With --write_benchmark it also times `write_synthmat` end to end.

  python -m experiments.synthmat_contact_sheet --image_size=64 \
      --sheet=experiments/results/synthmat_contact_sheet.png \
      --json=experiments/results/synthmat_separability.json --write_benchmark
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

from absl import app, flags
import numpy as np

from medcg import mat
from medcg.data.synth import LABELS, render, write_synthmat
from medcg.data.synth import probe as synth_probe

_SIZE = flags.DEFINE_integer("image_size", 64, "Image side in pixels.")
_EXAMPLES = flags.DEFINE_integer("examples", 2, "Examples per label on the contact sheet.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for rendering and probes.")
_PROBE_SIZE = flags.DEFINE_integer("probe_image_size", 64, "Image side the probes render at.")
_PROBE_N = flags.DEFINE_integer("probe_per_subset", 40, "Images per subset for the modality/area probes.")
_LABEL_N = flags.DEFINE_integer("probe_per_label", 40, "Images per label for the within-subset probes.")
_SHEET = flags.DEFINE_string("sheet", "experiments/results/synthmat_contact_sheet.png", "Contact sheet PNG.")
_JSON = flags.DEFINE_string("json", "experiments/results/synthmat_separability.json", "Probe results JSON.")
_WRITE_BENCH = flags.DEFINE_bool("write_benchmark", False,
                                 "Also time write_synthmat(per_subset=300, test_per_subset=60) into a temp dir.")


def contact_sheet(path: str, image_size: int, examples: int, seed: int) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ids = sorted(LABELS)
  cols = max(len(v) for v in LABELS.values()) * examples
  pad = max(2, image_size // 16)
  cell_w, cell_h = image_size + pad, image_size + max(10, image_size // 4)    # room for label captions
  sheet = np.full((len(ids) * cell_h, cols * cell_w, 3), 255, np.uint8)
  for r, sid in enumerate(ids):
    for li, label in enumerate(LABELS[sid]):
      for e in range(examples):
        img = render(sid, label, np.random.default_rng([seed, sid, 99, li, e]), image_size)
        c = li * examples + e
        sheet[r * cell_h:r * cell_h + image_size, c * cell_w:c * cell_w + image_size] = img
  px_per_inch = image_size / 0.75                     # each image 0.75 inch wide
  fig, ax = plt.subplots(figsize=(2.0 + sheet.shape[1] / px_per_inch, 0.5 + sheet.shape[0] / px_per_inch),
                         dpi=120)
  ax.imshow(sheet, interpolation="nearest")
  ax.set_yticks([r * cell_h + image_size / 2 for r in range(len(ids))])
  ax.set_yticklabels([f"{sid:02d} {' '.join(mat.get(sid).triplet)}" for sid in ids], fontsize=7)
  ax.set_xticks([])
  for r, sid in enumerate(ids):
    for li, label in enumerate(LABELS[sid]):
      ax.text(li * examples * cell_w, r * cell_h + image_size + 1, label[:34], fontsize=5.5,
              va="top", ha="left", color="black")
  ax.set_title(f"SynthMAT at {image_size} px: rows = subsets (modality area task), "
               f"columns = labels x {examples} examples", fontsize=9)
  for side in ("top", "right", "bottom", "left"):
    ax.spines[side].set_visible(False)
  fig.tight_layout()
  tmp = f"{path}.tmp{os.getpid()}.png"
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)


def main(argv):
  del argv
  results = {"command": " ".join(["python"] + sys.argv), "python": platform.python_version(),
             "machine": platform.machine(), "cpu_count": os.cpu_count(), "image_size": _SIZE.value,
             "probe_image_size": _PROBE_SIZE.value, "seed": _SEED.value,
             "probe": "ridge (l2=10) and nearest-centroid on 16x16x3 block-mean pixels; hist = ridge on "
                      "16-bin per-channel intensity histograms; chance = majority class; test images "
                      "rendered with a different seed than training images"}
  os.makedirs(os.path.dirname(_SHEET.value) or ".", exist_ok=True)
  t = time.perf_counter()
  contact_sheet(_SHEET.value, _SIZE.value, _EXAMPLES.value, _SEED.value)
  print(f"contact sheet -> {_SHEET.value} ({time.perf_counter() - t:.1f} s)")

  t = time.perf_counter()
  factors = synth_probe.factor_probes(per_subset=_PROBE_N.value, image_size=_PROBE_SIZE.value, seed=_SEED.value)
  labels = {f"{sid:02d}": synth_probe.label_probe(sid, per_label=_LABEL_N.value, image_size=_PROBE_SIZE.value,
                                                   seed=_SEED.value) for sid in sorted(LABELS)}
  results["factors"], results["labels"] = factors, labels
  results["probe_seconds"] = round(time.perf_counter() - t, 2)

  print(f"\n{'probe':<30}{'classes':>8}{'ridge':>8}{'hist':>8}{'centroid':>10}{'chance':>8}")
  for name, r in [(k, v) for k, v in factors.items()] + [
      (f"label {k} {' '.join(mat.get(int(k)).triplet)}", v) for k, v in labels.items()]:
    hist = f"{r['hist']:>8.3f}" if "hist" in r else f"{'-':>8}"
    print(f"{name:<30}{r['classes']:>8}{r['ridge']:>8.3f}{hist}{r['centroid']:>10.3f}{r['chance']:>8.3f}")
  above = sum(max(v["ridge"], v["hist"]) > v["chance"] + 0.1 for v in labels.values())
  print(f"label probes above chance + 0.10 (best of ridge, hist): {above}/{len(labels)} subsets")
  results["label_probes_above_chance_plus_0.1"] = above

  if _WRITE_BENCH.value:
    cpu = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
      summary = write_synthmat(tmp, image_size=_SIZE.value, per_subset=300, test_per_subset=60,
                               seed=_SEED.value, progress=False)
    cpu = time.process_time() - cpu
    results["write_benchmark"] = {"per_subset": 300, "test_per_subset": 60, "images": summary["num_images"],
                                  "seconds": summary["seconds"], "cpu_seconds": round(cpu, 2),
                                  "images_per_s": round(summary["num_images"] / summary["seconds"], 1)}
    print(f"write_synthmat 37 subsets x (300 train + ~60 test) at {_SIZE.value} px: "
          f"{summary['num_images']} images in {summary['seconds']:.1f} s wall, {cpu:.1f} s CPU")

  tmp = f"{_JSON.value}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")
  os.replace(tmp, _JSON.value)
  print(f"results -> {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
