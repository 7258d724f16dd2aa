"""SynthMAT rendering: area layout + label findings + modality image formation -> RGB uint8.

The three MAT factors enter at three separate places, which is what makes SynthMAT compositional by
construction:
  area     -> `anatomy.AREAS[area]`: tissue layout and the regions findings may sit in;
  task     -> `spec.SPECS[subset][label]`: which findings (shape, tissue, size, count) are present;
  modality -> `MODALITIES[modality]`: what each tissue looks like (palette), blur, noise model, field of
              view, colour. A finding is just tissue, so its look follows the modality automatically.
Detection subsets (`render_detection`) paint one object the same way and also return its tight box.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from medcg import mat
from medcg.data.synth import anatomy as anat
from medcg.data.synth import shapes as shp
from medcg.data.synth.spec import DET_SPECS, ORGAN, QUALITY, SPECS, Finding

# ---------------------------------------------------------------------------------------------------
# Findings: a shape kind drawn at a site, with radius r (normalised units).


def _min_r(g, r):
  return max(r, 1.2 * g.px)


def _round(g, rng, x, y, r):
  a = rng.uniform(0.8, 1.25)
  return shp.ellipse(g, x, y, _min_r(g, r * a), _min_r(g, r / a), angle=rng.uniform(0, np.pi))


def _spiculated(g, rng, x, y, r):
  k = np.arange(2, 6)[:, None, None]
  amp, ph = rng.uniform(0.05, 0.15, (4, 1, 1)), rng.uniform(0, 2 * np.pi, (4, 1, 1))
  n, p = int(rng.integers(7, 12)), rng.uniform(0, 2 * np.pi)

  def radius(t):
    lobes = 1 + (amp * np.cos(k * t[None] + ph)).sum(axis=0)
    spikes = 1 + 0.7 * np.maximum(np.cos(n * t + p), 0) ** 6
    return _min_r(g, r * 0.8) * lobes * spikes
  return shp.polar(g, x, y, radius)


def _ring(g, rng, x, y, r):
  r = _min_r(g, r)
  return np.clip(shp.ellipse(g, x, y, r, r) - shp.ellipse(g, x, y, 0.6 * r, 0.6 * r), 0, 1)


def _dot(g, rng, x, y, r):
  r = _min_r(g, r)
  return shp.ellipse(g, x, y, r, r, soft=0.7)


def _cluster(g, rng, x, y, r):
  out = np.zeros_like(g.u)
  for _ in range(int(rng.integers(5, 9))):
    dx, dy = rng.normal(0, 2.0 * r, 2)
    out = np.maximum(out, _dot(g, rng, x + dx, y + dy, r * rng.uniform(0.6, 1.0)))
  return out


def _patchy(g, rng, x, y, r):
  ph = rng.uniform(0, 2 * np.pi, 3)
  blob = shp.polar(g, x, y, lambda t: r * (1 + 0.2 * np.cos(2 * t + ph[0]) + 0.12 * np.cos(3 * t + ph[1])),
                   soft=3)
  return 0.9 * blob * np.clip(0.75 + 0.25 * shp.smooth_noise(rng, g, 10), 0, 1)


def _line(g, rng, x, y, r):
  ang = rng.uniform(0, np.pi)
  d = 1.5 * r * np.array([np.cos(ang), np.sin(ang)])
  mid = np.array([x, y]) + rng.normal(0, 0.1 * r, 2)
  return shp.polyline(g, np.array([[x, y] - d, mid, [x, y] + d]), max(0.015, 0.7 * g.px))


def _bar(g, rng, x, y, r):
  return shp.box(g, x, y, max(0.2 * r, g.px), 1.5 * r, angle=rng.uniform(-0.3, 0.3))


def _texture(g, rng, x, y, r):
  grain = np.clip(shp.smooth_noise(rng, g, max(8, g.size // 4)) * 1.5, 0, 1)
  return shp.ellipse(g, x, y, 1.2 * r, r, soft=2) * (0.35 + 0.65 * grain)


def _lobed(g, rng, x, y, r):
  out, p = np.zeros_like(g.u), rng.uniform(0, 2 * np.pi)
  for k in range(3):
    a = p + 2.1 * k
    out = np.maximum(out, _dot(g, rng, x + 0.5 * r * np.cos(a), y + 0.5 * r * np.sin(a), 0.42 * r))
  return out


def _bilobed(g, rng, x, y, r):
  a = rng.uniform(0, np.pi)
  dx, dy = 0.45 * r * np.cos(a), 0.45 * r * np.sin(a)
  return np.maximum(_dot(g, rng, x + dx, y + dy, 0.45 * r), _dot(g, rng, x - dx, y - dy, 0.45 * r))


def _bean(g, rng, x, y, r):
  a = rng.uniform(0, 2 * np.pi)
  body = shp.ellipse(g, x, y, _min_r(g, r), _min_r(g, 0.72 * r), angle=a)
  bite = shp.ellipse(g, x + 0.75 * r * np.cos(a + 1.57), y + 0.75 * r * np.sin(a + 1.57),
                     _min_r(g, 0.45 * r), _min_r(g, 0.45 * r))
  return body * (1 - bite)


def _granules(g, rng, x, y, r):
  out = np.zeros_like(g.u)
  for _ in range(10):
    a, d = rng.uniform(0, 2 * np.pi), r * np.sqrt(rng.uniform(0.15, 0.8))
    out = np.maximum(out, _dot(g, rng, x + d * np.cos(a), y + d * np.sin(a), 0.09 * r))
  return out


def _nucleoli(g, rng, x, y, r):
  return np.maximum(_dot(g, rng, x + 0.3 * r, y, 0.25 * r), _dot(g, rng, x - 0.3 * r, y + 0.2 * r, 0.25 * r))


FINDING_KINDS: dict[str, Callable] = {
    "round": _round, "spiculated": _spiculated, "ring": _ring, "dot": _dot, "cluster": _cluster,
    "patchy": _patchy, "line": _line, "bar": _bar, "texture": _texture, "lobed": _lobed, "bilobed": _bilobed,
    "bean": _bean, "granules": _granules, "nucleoli": _nucleoli,
}


def _region(layout, name: str | None) -> np.ndarray:
  mask = layout.regions.get(name or layout.default_region)
  if mask is None:
    raise KeyError(f"area layout has no region {name!r}; it has {sorted(layout.regions)}")
  return mask


def _sites(rng, g, layout, region: str | None, n: int) -> np.ndarray:
  """n finding centres drawn from a region of the layout (the area decides where findings sit)."""
  mask = _region(layout, region)
  idx = np.flatnonzero(mask.ravel() > 0.5)
  if idx.size == 0:
    idx = np.flatnonzero(mask.ravel() >= mask.max())
  pick = rng.choice(idx, size=n, replace=idx.size < n)
  return np.stack([g.u.ravel()[pick], g.v.ravel()[pick]], axis=1)


def _paint_diffuse(canvas, rng, g, layout, f: Finding):
  """Ground-glass-like haze over the whole region, patchier towards its periphery."""
  mask = _region(layout, f.region)
  haze = np.clip(0.55 * shp.smooth_noise(rng, g, 7) + 0.45, 0, 1)
  canvas.paint(f.tissue, 0.75 * f.strength * haze * mask)


def _paint_nuclei(canvas, rng, g, layout, components):
  """Cell areas: every cell gets a nucleus. Cell-type labels replace the default round one; a
  multi-label caption splits the cells among its components."""
  nucleus_sets = [tuple(f for f in comp if f.nucleus) for comp in components]
  nucleus_sets = [s for s in nucleus_sets if s] or [(Finding("round", ORGAN, 0.5, nucleus=True),)]
  for i, (x, y, rc) in enumerate(layout.cells):
    for f in nucleus_sets[i % len(nucleus_sets)]:
      canvas.paint(f.tissue, f.strength * FINDING_KINDS[f.kind](g, rng, x, y, f.size * rc))


def _paint_findings(canvas, rng, g, layout, findings, components):
  if layout.cells is not None:
    _paint_nuclei(canvas, rng, g, layout, components)
  for f in findings:
    if f.nucleus:
      continue
    if f.kind == "diffuse":
      _paint_diffuse(canvas, rng, g, layout, f)
      continue
    draw = FINDING_KINDS[f.kind]
    if layout.cells is not None and f.region is None:
      # Cell areas: findings are abnormal nuclei, drawn over the nuclei of randomly chosen cells.
      cells = layout.cells[rng.permutation(len(layout.cells))[:f.count]]
      for x, y, rc in cells:
        canvas.paint(f.tissue, f.strength * draw(g, rng, x, y, f.size * rc))
      continue
    for x, y in _sites(rng, g, layout, f.region, f.count):
      canvas.paint(f.tissue, f.strength * draw(g, rng, x, y, f.size * layout.scale * rng.uniform(0.85, 1.15)))


# ---------------------------------------------------------------------------------------------------
# Modalities: tissue palette (background, soft, organ, fluid, dense, blood, lesion) + image formation.


@dataclasses.dataclass(frozen=True)
class Modality:
  palette: tuple                  # 7 grey levels or 7 RGB triples, one per tissue class
  form: Callable                  # (rgb (S,S,3) float, rng, grid) -> rgb


def _grey(*levels):
  return tuple((v, v, v) for v in levels)


def _circle_fov(img, g, radius):
  return img * shp.sigmoid_inside(np.hypot(g.u, g.v) - radius, g.edge(1.0))[..., None]


def _gauss(rng, img, sigma):
  return img + rng.normal(0, sigma, img.shape[:2])[..., None].astype(np.float32)


def _form_ct(img, rng, g):
  img = shp.blur(img, 0.3 + 0.004 * g.size)
  img = (img - 0.5) * rng.uniform(1.0, 1.2) + 0.5 + rng.uniform(-0.04, 0.04)        # window/level
  return _circle_fov(_gauss(rng, img, 0.035), g, 0.97)


def _form_mri(img, rng, g):
  img = shp.blur(img, 0.012 * g.size)
  bias = 1.0 + 0.3 * shp.smooth_noise(rng, g, 3)                                    # coil bias field
  img = img * bias[..., None]
  n1, n2 = rng.normal(0, 0.04, (2,) + img.shape[:2]).astype(np.float32)             # Rician noise
  return np.sqrt((img + n1[..., None]) ** 2 + n2[..., None] ** 2)


def _form_xray(img, rng, g):
  img = shp.blur(img, 0.018 * g.size)                                               # projection blur
  img = img ** 0.85 + 0.06 * (g.v[..., None] + 1) / 2
  img = _gauss(rng, img, 0.012)
  marker = shp.box(g, -0.82, -0.85, 0.05, 0.05)                                     # film side marker
  return np.maximum(img, marker[..., None])


def _form_us(img, rng, g):
  au, av = g.u, g.v + 1.1                                                           # probe apex above
  r, ang = np.hypot(au, av), np.arctan2(au, av)
  fan = shp.sigmoid_inside(np.abs(ang) - 0.62, 0.01) * shp.sigmoid_inside(r - 2.05, g.px)
  fan = fan * shp.sigmoid_inside(0.25 - r, g.px)
  speckle = rng.gamma(4.0, 0.25, img.shape[:2]).astype(np.float32)
  img = shp.blur(img * speckle[..., None], 0.7) * (1.0 - 0.3 * (r / 2.0))[..., None]
  return img * fan[..., None]


def _vignette(g, strength):
  return (1.0 - strength * (g.u ** 2 + g.v ** 2) / 2)[..., None]


def _colour_jitter(img, rng, amount):
  return img * rng.uniform(1 - amount, 1 + amount, 3).astype(np.float32)


def _speculars(img, rng, g, n):
  for _ in range(n):
    img = np.maximum(img, 0.95 * shp.ellipse(g, *rng.uniform(-0.7, 0.7, 2), 0.02 + g.px, 0.015 + g.px)[..., None])
  return img


def _form_fundus(img, rng, g):
  img = _colour_jitter(shp.blur(img, 0.4 + 0.004 * g.size), rng, 0.08) * _vignette(g, 0.45)
  return _circle_fov(_gauss(rng, img, 0.015), g, 0.93)


def _form_micro(img, rng, g):
  return _gauss(rng, _colour_jitter(shp.blur(img, 0.5), rng, 0.1), 0.02)


def _form_dermo(img, rng, g):
  img = _colour_jitter(shp.blur(img, 0.5), rng, 0.1) * _vignette(g, 0.25)
  return _circle_fov(_gauss(rng, img, 0.015), g, 1.1)


def _form_endo(img, rng, g):
  img = _colour_jitter(shp.blur(img, 0.6 + 0.004 * g.size), rng, 0.06) * _vignette(g, 0.7)
  img = _speculars(img, rng, g, int(rng.integers(2, 6)))
  corners = shp.sigmoid_inside(np.abs(g.u) + np.abs(g.v) - 1.45, g.px)             # octagonal scope mask
  return _circle_fov(_gauss(rng, img, 0.02), g, 1.12) * corners[..., None]


def _form_oct(img, rng, g):
  speckle = rng.gamma(6.0, 1 / 6.0, img.shape[:2]).astype(np.float32)
  img = shp.blur(img * speckle[..., None], 1.0, axes=(1,))                          # A-scan averaging
  return _gauss(rng, img, 0.02)


def _form_photo(img, rng, g):
  a = rng.uniform(0, 2 * np.pi)                                                     # light direction
  light = 1.0 - 0.25 * (np.cos(a) * g.u + np.sin(a) * g.v)[..., None]
  return _gauss(rng, _colour_jitter(shp.blur(img, 0.5), rng, 0.08) * light, 0.02)


def _form_colpo(img, rng, g):
  img = _colour_jitter(shp.blur(img, 0.6), rng, 0.08) * _vignette(g, 0.6)
  img = _speculars(img, rng, g, int(rng.integers(1, 4)))
  return _circle_fov(_gauss(rng, img, 0.02), g, 1.05)


#                    background          soft                organ               fluid
#                    dense               blood               lesion
MODALITIES: dict[str, Modality] = {
    "CT": Modality(_grey(0.0, 0.38, 0.6, 0.16, 0.98, 0.78, 0.74), _form_ct),
    "MRI": Modality(_grey(0.0, 0.36, 0.52, 0.95, 0.08, 0.82, 0.9), _form_mri),
    "X-ray": Modality(_grey(0.03, 0.33, 0.42, 0.44, 0.95, 0.42, 0.68), _form_xray),
    "US": Modality(_grey(0.28, 0.45, 0.6, 0.03, 1.0, 0.12, 0.1), _form_us),
    "OCT": Modality(_grey(0.03, 0.3, 0.62, 0.04, 0.95, 0.45, 0.85), _form_oct),
    "FP": Modality(((0, 0, 0), (0.82, 0.4, 0.13), (0.6, 0.24, 0.07), (0.96, 0.86, 0.38),
                    (1.0, 0.93, 0.68), (0.45, 0.06, 0.03), (0.92, 0.8, 0.35)), _form_fundus),
    "Mic": Modality(((0.96, 0.9, 0.94), (0.92, 0.6, 0.77), (0.42, 0.22, 0.6), (0.98, 0.95, 0.97),
                     (0.72, 0.2, 0.45), (0.86, 0.28, 0.35), (0.2, 0.08, 0.38)), _form_micro),
    "Der": Modality(((0.1, 0.07, 0.06), (0.88, 0.67, 0.55), (0.8, 0.56, 0.46), (0.96, 0.92, 0.82),
                     (0.22, 0.14, 0.1), (0.76, 0.25, 0.26), (0.36, 0.2, 0.12)), _form_dermo),
    "End": Modality(((0.1, 0.02, 0.02), (0.88, 0.47, 0.42), (0.74, 0.33, 0.3), (0.72, 0.6, 0.24),
                     (0.96, 0.92, 0.88), (0.58, 0.06, 0.07), (0.98, 0.78, 0.7)), _form_endo),
    "DP": Modality(((0.16, 0.04, 0.05), (0.86, 0.58, 0.5), (0.86, 0.4, 0.43), (0.96, 0.96, 0.9),
                    (0.95, 0.93, 0.84), (0.74, 0.12, 0.13), (0.34, 0.22, 0.1)), _form_photo),
    "Co": Modality(((0.28, 0.08, 0.09), (0.8, 0.44, 0.44), (0.92, 0.57, 0.56), (0.92, 0.87, 0.77),
                    (0.97, 0.95, 0.92), (0.68, 0.09, 0.11), (0.97, 0.93, 0.9)), _form_colpo),
}


def _degrade(img, rng, g):
  """A "Bad" quality image: defocus, sensor noise and wrong exposure."""
  img = shp.blur(img, 0.035 * g.size)
  img = img * rng.choice([0.45, 1.7])
  return _gauss(rng, img, 0.08)


def _form(subset, canvas, rng, g, quality=None) -> np.ndarray:
  """Tissue weights -> the modality's image, as uint8 (S, S, 3)."""
  modality = MODALITIES[subset.modality]
  palette = np.asarray(modality.palette, np.float32)                                 # (7, 3)
  if (palette == palette[:, :1]).all():
    palette = palette[:, :1]                        # grey modality: form one channel, copy it at the end
  img = np.einsum("chw,ck->hwk", canvas.w, palette)
  img = modality.form(img, rng, g)
  if quality == "Bad":
    img = _degrade(img, rng, g)
  img = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def tight_box(alpha: np.ndarray) -> tuple[float, float, float, float] | None:
  """The box (x1, y1, x2, y2), normalised 0-1, around the pixels where `alpha` > 0.5 (None if there are none).

  Pixel edges, not centres: a mask covering columns 3..5 of 32 gives x1 = 3/32 and x2 = 6/32.
  """
  rows, cols = np.nonzero(alpha > 0.5)
  if rows.size == 0:
    return None
  h, w = alpha.shape
  return (cols.min() / w, rows.min() / h, (cols.max() + 1) / w, (rows.max() + 1) / h)


_MAX_TRIES = 8


def _object_mask(rng, g, layout, f: Finding) -> np.ndarray:
  """The alpha mask of one detection object: on a cell (cell areas) or at a site of its region."""
  draw = FINDING_KINDS[f.kind]
  if layout.cells is not None and f.region is None:
    x, y, rc = layout.cells[int(rng.integers(len(layout.cells)))]
    return f.strength * draw(g, rng, x, y, f.size * rc)
  (x, y), = _sites(rng, g, layout, f.region, 1)
  return f.strength * draw(g, rng, x, y, f.size * layout.scale * rng.uniform(0.85, 1.15))


def render_detection(subset_id: int, rng: np.random.Generator, image_size: int
                     ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
  """One SynthMAT detection image (uint8 (S, S, 3)) and the tight 0-1 box of its single object.

  The box is the extent of the object's painted mask (alpha > 0.5), before image formation blurs it,
  so it is what an annotator outlining the object would draw.
  """
  s = mat.get(subset_id)
  spec = DET_SPECS.get(s.id)
  if spec is None:
    raise KeyError(f"SynthMAT has no detection subset {s.id:02d} (detection subsets are 38-50)")
  g = shp.grid(image_size)
  layout = anat.AREAS[s.area](rng, g)
  if layout.cells is not None:
    _paint_nuclei(layout.canvas, rng, g, layout, [()])
  for _ in range(_MAX_TRIES):  # a site at the very edge can leave too little of the object in view
    alpha = _object_mask(rng, g, layout, spec.finding)
    box = tight_box(alpha)
    if box is not None:
      break
  else:
    raise RuntimeError(f"subset {s.id:02d}: no visible object after {_MAX_TRIES} draws at {image_size} px")
  layout.canvas.paint(spec.finding.tissue, alpha)
  return _form(s, layout.canvas, rng, g), box


def render(subset_id: int, label: str, rng: np.random.Generator, image_size: int) -> np.ndarray:
  """One SynthMAT image of `label` for a classification subset, as uint8 (S, S, 3)."""
  s = mat.get(subset_id)
  spec = SPECS.get(s.id)
  if spec is None:
    raise KeyError(f"SynthMAT has no classification subset {s.id:02d} (detection subsets: render_detection)")
  if label not in spec:
    raise KeyError(f"subset {s.id:02d} has no label {label!r}; labels are {list(spec)}")
  g = shp.grid(image_size)
  quality = label if tuple(spec) == QUALITY else None
  layout = (anat.outlier if quality == "Outlier" else anat.AREAS[s.area])(rng, g)
  components = [spec[c] for c in label.split(", ")] if ", " in label else [spec[label]]
  _paint_findings(layout.canvas, rng, g, layout, spec[label], components)
  return _form(s, layout.canvas, rng, g, quality)

