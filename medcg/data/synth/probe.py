"""Linear probes on raw SynthMAT pixels: evidence that modality, area and labels really vary.

A closed-form ridge classifier on block-averaged pixels (and a nearest-centroid one) must tell the
modality and the area of an image apart far above chance, and the label within a subset above chance;
if they cannot, the generator is not compositional and no CG experiment on it means anything.
Used by tests/test_synthetic.py and experiments/synthmat_contact_sheet.py.
"""
from __future__ import annotations

import numpy as np

from medcg import mat
from medcg.data.synth.imaging import render
from medcg.data.synth.spec import LABELS


def pixel_features(images: np.ndarray, grid: int = 16) -> np.ndarray:
  """(N, S, S, 3) uint8 -> (N, grid*grid*3) float32 block means in [0, 1]."""
  n, s = images.shape[:2]
  if s % grid:
    raise ValueError(f"image size {s} is not a multiple of the probe grid {grid}")
  k = s // grid
  x = images.astype(np.float32).reshape(n, grid, k, grid, k, 3).mean(axis=(2, 4)) / 255.0
  return x.reshape(n, -1)


def histogram_features(images: np.ndarray, bins: int = 16) -> np.ndarray:
  """(N, S, S, 3) uint8 -> (N, 3*bins) per-channel intensity histograms: a position-invariant view
  that sees small findings at random sites (stones, dots, counts) which block means average away."""
  n = len(images)
  q = images.reshape(n, -1, 3).astype(np.int64) * bins // 256
  idx = q + bins * np.arange(3) + 3 * bins * np.arange(n)[:, None, None]
  counts = np.bincount(idx.ravel(), minlength=n * 3 * bins).reshape(n, 3 * bins)
  return (counts / q.shape[1]).astype(np.float32)


def render_set(subset_ids, per_subset: int, image_size: int, seed: int):
  """Images with (subset, label index) targets, labels cycling so every label is present."""
  images, subsets, labels = [], [], []
  for sid in subset_ids:
    names = LABELS[sid]
    for i in range(per_subset):
      rng = np.random.default_rng([seed, sid, 7, i])
      images.append(render(sid, names[i % len(names)], rng, image_size))
      subsets.append(sid)
      labels.append(i % len(names))
  return np.stack(images), np.array(subsets), np.array(labels)


def _standardise(train, test):
  mu, sd = train.mean(0), train.std(0) + 1e-3
  return (train - mu) / sd, (test - mu) / sd


def ridge_accuracy(x_train, y_train, x_test, y_test, l2: float = 10.0) -> float:
  """Test accuracy of a one-vs-rest ridge regression classifier (closed form)."""
  x_train, x_test = _standardise(x_train, x_test)
  classes = np.unique(y_train)
  targets = (y_train[:, None] == classes[None]).astype(np.float32)
  xb = np.hstack([x_train, np.ones((len(x_train), 1), np.float32)])
  w = np.linalg.solve(xb.T @ xb + l2 * np.eye(xb.shape[1], dtype=np.float32), xb.T @ targets)
  pred = classes[(np.hstack([x_test, np.ones((len(x_test), 1), np.float32)]) @ w).argmax(1)]
  return float((pred == y_test).mean())


def centroid_accuracy(x_train, y_train, x_test, y_test) -> float:
  """Test accuracy of nearest-centroid classification on standardised features."""
  x_train, x_test = _standardise(x_train, x_test)
  classes = np.unique(y_train)
  cents = np.stack([x_train[y_train == c].mean(0) for c in classes])
  d = ((x_test[:, None, :] - cents[None]) ** 2).sum(-1)
  return float((classes[d.argmin(1)] == y_test).mean())


def chance(y_train, y_test) -> float:
  """Accuracy of always predicting the most frequent training class."""
  vals, counts = np.unique(y_train, return_counts=True)
  return float((y_test == vals[counts.argmax()]).mean())


def _probes(x_tr, y_tr, x_te, y_te, classes: int) -> dict[str, float]:
  return {"ridge": ridge_accuracy(x_tr, y_tr, x_te, y_te), "centroid": centroid_accuracy(x_tr, y_tr, x_te, y_te),
          "chance": chance(y_tr, y_te), "classes": classes}


# Factor probes where the other factor is held fixed, so a modality/area confound cannot explain them.
CONDITIONAL = (("area", "modality", "X-ray"), ("modality", "area", "Brain"), ("modality", "area", "Breast"),
               ("modality", "area", "Lung"))


def factor_probes(subset_ids=None, per_subset: int = 24, image_size: int = 32, seed: int = 0,
                  grid: int = 16) -> dict[str, dict[str, float]]:
  """Ridge / nearest-centroid / chance accuracy for modality and area over the given subsets, plus
  `CONDITIONAL` probes ("area | modality=X-ray", ...) over the subsets that hold the other factor fixed."""
  subset_ids = sorted(LABELS) if subset_ids is None else list(subset_ids)
  tr_img, tr_sub, _ = render_set(subset_ids, per_subset, image_size, seed)
  te_img, te_sub, _ = render_set(subset_ids, per_subset, image_size, seed + 1)
  x_tr, x_te = pixel_features(tr_img, grid), pixel_features(te_img, grid)
  out = {}
  for factor, given, value in [("modality", None, None), ("area", None, None), *CONDITIONAL]:
    keep = [sid for sid in subset_ids if given is None or getattr(mat.get(sid), given) == value]
    names = sorted({getattr(mat.get(s), factor) for s in keep})
    if len(names) < 2:
      continue
    to_idx = {sid: names.index(getattr(mat.get(sid), factor)) for sid in keep}
    tr, te = np.isin(tr_sub, keep), np.isin(te_sub, keep)
    y_tr, y_te = np.vectorize(to_idx.get)(tr_sub[tr]), np.vectorize(to_idx.get)(te_sub[te])
    key = factor if given is None else f"{factor} | {given}={value}"
    out[key] = _probes(x_tr[tr], y_tr, x_te[te], y_te, len(names))
  return out


def label_probe(subset_id: int, per_label: int = 40, image_size: int = 32, seed: int = 0,
                grid: int = 16) -> dict[str, float]:
  """Ridge (pixels), ridge on histograms (`hist`), nearest-centroid and chance accuracy for the labels
  of one subset."""
  n = per_label * len(LABELS[subset_id])
  tr_img, _, y_tr = render_set([subset_id], n, image_size, seed)
  te_img, _, y_te = render_set([subset_id], n, image_size, seed + 1)
  x_tr, x_te = pixel_features(tr_img, grid), pixel_features(te_img, grid)
  out = _probes(x_tr, y_tr, x_te, y_te, len(LABELS[subset_id]))
  out["hist"] = ridge_accuracy(histogram_features(tr_img), y_tr, histogram_features(te_img), y_te)
  return out
