"""SynthMAT anatomy: one layout per anatomical area, painted as tissue classes.

A layout is modality-free: it says which tissue (soft, organ, fluid, dense, blood, ...) sits where, and
names the regions where findings may appear ("lungs", "base", "joint", "disc", ...). The modality
later decides what each tissue looks like, so the same lung layout becomes a CT slice or a radiograph.
Every layout is jittered per image (position, size, angle) so no two images are alike.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from medcg.data.synth import shapes as shp
from medcg.data.synth.spec import BACKGROUND, BLOOD, DENSE, FLUID, NUM_TISSUES, ORGAN, SOFT


class Canvas:
  """Per-pixel tissue mixture weights (NUM_TISSUES, S, S), composited with "over"."""

  def __init__(self, g: shp.Grid):
    self.g = g
    self.w = np.zeros((NUM_TISSUES, g.size, g.size), np.float32)
    self.w[BACKGROUND] = 1.0

  def paint(self, tissue: int, alpha: np.ndarray) -> None:
    alpha = np.clip(alpha, 0.0, 1.0)
    self.w *= 1.0 - alpha
    self.w[tissue] += alpha


@dataclasses.dataclass
class Layout:
  """A painted area plus where findings may go."""
  canvas: Canvas
  regions: dict[str, np.ndarray]      # name -> soft mask (S, S)
  default_region: str
  scale: float                        # typical finding radius, normalised units
  cells: np.ndarray | None = None     # (N, 3) cell centres and radii for cell areas


def _j(rng, amount):
  return float(rng.uniform(-amount, amount))


def _thorax(rng, g, chest: bool) -> Layout:
  c = Canvas(g)
  dy = _j(rng, 0.04)
  c.paint(SOFT, shp.ellipse(g, _j(rng, 0.03), dy + 0.05, 0.9 + _j(rng, 0.04), 0.92))
  lungs = np.zeros_like(g.u)
  for side in (-1, 1):
    m = shp.ellipse(g, side * (0.4 + _j(rng, 0.03)), dy - 0.02, 0.27 + _j(rng, 0.02), 0.57 + _j(rng, 0.03),
                    angle=side * 0.12)
    lungs = np.maximum(lungs, m)
  c.paint(BACKGROUND, lungs)
  c.paint(ORGAN, 0.18 * lungs * np.clip(shp.smooth_noise(rng, g, 9), 0, None))   # vessel markings
  c.paint(DENSE, shp.ellipse(g, 0.0, dy + 0.72, 0.11, 0.1))                       # vertebra
  regions = {"lungs": lungs, "upper": lungs * (g.v < dy - 0.15), "base": lungs * (g.v > dy + 0.18)}
  if chest:
    heart = shp.ellipse(g, 0.13 + _j(rng, 0.03), dy + 0.27, 0.3, 0.25, angle=-0.3)
    c.paint(ORGAN, heart)
    for k in range(5):                                         # ribs: arcs across both lung fields
      y0 = dy - 0.55 + 0.24 * k
      rib = np.abs(g.v - (y0 + 0.22 * g.u ** 2)) < 0.025
      c.paint(DENSE, 0.55 * rib * (np.abs(g.u) > 0.12) * (np.abs(g.u) < 0.75))
    for side in (-1, 1):                                       # clavicles
      c.paint(DENSE, shp.polyline(g, np.array([[side * 0.1, dy - 0.7], [side * 0.65, dy - 0.8]]), 0.035))
    regions["heart"] = heart
  return Layout(c, regions, "lungs", 0.13)


def lung(rng, g):
  return _thorax(rng, g, chest=False)


def chest(rng, g):
  return _thorax(rng, g, chest=True)


def brain(rng, g) -> Layout:
  c = Canvas(g)
  cx, cy, rx, ry = _j(rng, 0.04), _j(rng, 0.04), 0.74 + _j(rng, 0.04), 0.88 + _j(rng, 0.03)
  c.paint(DENSE, shp.ellipse(g, cx, cy, rx, ry))
  inner = shp.ellipse(g, cx, cy, rx - 0.07, ry - 0.07)
  c.paint(SOFT, inner)
  c.paint(ORGAN, 0.35 * inner * np.clip(shp.smooth_noise(rng, g, 10), 0, None))  # grey-matter folds
  vent = np.zeros_like(g.u)
  for side in (-1, 1):
    vent = np.maximum(vent, shp.ellipse(g, cx + side * 0.12, cy - 0.05, 0.07, 0.22, angle=side * 0.35))
  c.paint(FLUID, vent)
  r = np.sqrt(((g.u - cx) / (rx - 0.07)) ** 2 + ((g.v - cy) / (ry - 0.07)) ** 2)
  return Layout(c, {"brain": inner * (1 - vent) * (r < 0.8), "periphery": inner * (r > 0.72) * (r < 0.88),
                    "sella": shp.ellipse(g, cx, cy + 0.38, 0.1, 0.07)}, "brain", 0.13)


def kidney(rng, g) -> Layout:
  c = Canvas(g)
  dy = _j(rng, 0.05)
  c.paint(SOFT, shp.ellipse(g, 0.0, dy + 0.05, 0.93, 0.74))
  c.paint(DENSE, shp.ellipse(g, 0.0, dy + 0.45, 0.12, 0.12))
  c.paint(BLOOD, shp.ellipse(g, 0.06, dy + 0.25, 0.06, 0.06))                      # aorta
  for _ in range(int(rng.integers(2, 5))):                                         # bowel gas
    c.paint(BACKGROUND, shp.ellipse(g, _j(rng, 0.5), dy - 0.35 + _j(rng, 0.15), 0.06, 0.05))
  kid = np.zeros_like(g.u)
  for side in (-1, 1):
    kx, ky = side * (0.45 + _j(rng, 0.03)), dy + 0.1 + _j(rng, 0.04)
    bean = shp.ellipse(g, kx, ky, 0.21, 0.31, angle=side * 0.25)
    bean = bean * (1 - shp.ellipse(g, kx - side * 0.17, ky, 0.09, 0.1))
    kid = np.maximum(kid, bean)
  c.paint(ORGAN, kid)
  return Layout(c, {"kidney": kid}, "kidney", 0.1)


def bones(rng, g) -> Layout:
  """A knee (two long bones and a joint) or a lumbar spine (a column of vertebrae)."""
  c = Canvas(g)
  if rng.random() < 0.5:
    jy = _j(rng, 0.08)
    c.paint(SOFT, shp.box(g, 0.0, 0.0, 0.62, 1.2, soft=6))
    femur = np.maximum(shp.box(g, 0.0, jy - 0.6, 0.18, 0.5), shp.ellipse(g, 0.0, jy - 0.15, 0.38, 0.17))
    tibia = np.maximum(shp.box(g, 0.0, jy + 0.62, 0.16, 0.45), shp.ellipse(g, 0.0, jy + 0.2, 0.37, 0.11))
    fibula = shp.box(g, 0.33, jy + 0.65, 0.05, 0.38)
    bone = np.maximum(np.maximum(femur, tibia), fibula)
    c.paint(DENSE, bone)
    joint = shp.box(g, 0.0, jy + 0.03, 0.45, 0.2)
    shaft = np.maximum(shp.box(g, 0.0, jy - 0.65, 0.18, 0.3), shp.box(g, 0.0, jy + 0.65, 0.16, 0.25))
  else:
    dx = _j(rng, 0.06)
    c.paint(SOFT, shp.ellipse(g, 0.0, 0.0, 0.9, 1.3, soft=6))
    bone = np.zeros_like(g.u)
    joint = np.zeros_like(g.u)
    for k in range(5):
      vy = -0.8 + 0.4 * k + _j(rng, 0.02)
      vx = dx + 0.04 * np.sin(k + dx * 9)
      bone = np.maximum(bone, shp.box(g, vx, vy, 0.27, 0.14, corner=0.04))
      joint = np.maximum(joint, shp.box(g, vx, vy - 0.14, 0.36, 0.08))
      joint = np.maximum(joint, shp.box(g, vx, vy + 0.14, 0.36, 0.08))
    c.paint(DENSE, bone)
    shaft = bone
  # Findings graded at the joint (osteophytes) sit on its margins, outside the bone, where they show.
  return Layout(c, {"bone": bone, "joint": joint * (1 - bone), "shaft": shaft}, "bone", 0.12)


def breast(rng, g) -> Layout:
  c = Canvas(g)
  cy, rx = _j(rng, 0.06), 1.5 + _j(rng, 0.1)
  outline = shp.ellipse(g, -1.0, cy, rx, 0.92, soft=2)
  c.paint(SOFT, outline)
  gland = shp.ellipse(g, -1.0, cy, rx - 0.45, 0.65, soft=6)
  c.paint(ORGAN, 0.55 * gland * np.clip(shp.smooth_noise(rng, g, 8) + 0.3, 0, 1))
  c.paint(ORGAN, 0.8 * outline * (g.u + 0.9 * g.v < -1.1))                         # pectoral muscle
  c.paint(SOFT, shp.ellipse(g, -1.0 + rx, cy, 0.05, 0.06))                          # nipple
  inner = shp.ellipse(g, -1.0, cy, rx - 0.2, 0.78) * (g.u > -0.8) * (g.u + 0.9 * g.v > -0.95)
  return Layout(c, {"breast": inner}, "breast", 0.12)


def skin(rng, g) -> Layout:
  c = Canvas(g)
  c.paint(SOFT, np.ones_like(g.u))
  c.paint(ORGAN, 0.25 * np.clip(shp.smooth_noise(rng, g, 12), 0, 1))
  for _ in range(int(rng.integers(2, 6))):                                          # hairs
    p0 = rng.uniform(-1, 1, 2)
    ang = rng.uniform(0, np.pi)
    pts = p0 + np.outer(np.linspace(-0.8, 0.8, 5), [np.cos(ang), np.sin(ang)]) + rng.normal(0, 0.04, (5, 2))
    c.paint(DENSE, 0.8 * shp.polyline(g, pts, 0.006 + 0.3 * g.px))
  # "field": where a detection subset's lesion may sit (most of the view), so its box moves around.
  return Layout(c, {"skin": shp.ellipse(g, 0, 0, 0.3, 0.3), "field": shp.ellipse(g, 0, 0, 0.62, 0.62)},
                "skin", 0.3)


def mouth(rng, g) -> Layout:
  c = Canvas(g)
  c.paint(SOFT, np.ones_like(g.u))
  dy = _j(rng, 0.05)
  c.paint(BACKGROUND, shp.ellipse(g, 0.0, dy, 0.88, 0.62))
  gums = np.maximum(shp.ellipse(g, 0.0, dy - 0.36, 0.84, 0.17), shp.ellipse(g, 0.0, dy + 0.38, 0.8, 0.16))
  c.paint(ORGAN, gums)
  teeth = np.zeros_like(g.u)
  for row, ty in ((-1, dy - 0.2), (1, dy + 0.22)):
    xs = np.linspace(-0.58, 0.58, 6)
    for x in xs:
      teeth = np.maximum(teeth, shp.box(g, x, ty + 0.05 * x ** 2 * row, 0.095, 0.13 - 0.03 * abs(x),
                                            corner=0.05))
  c.paint(DENSE, teeth)
  return Layout(c, {"teeth": teeth, "gums": gums * (1 - teeth)}, "teeth", 0.1)


def intestine(rng, g) -> Layout:
  c = Canvas(g)
  c.paint(SOFT, np.ones_like(g.u))
  lx, ly = _j(rng, 0.25), _j(rng, 0.25)
  for k in range(4, 0, -1):                                                        # haustral folds
    phase, rad = rng.uniform(0, 2 * np.pi), 0.3 + 0.2 * k
    ring = shp.polar(g, lx, ly, lambda t, r=rad, p=phase: r * (1 + 0.08 * np.cos(3 * t + p)))
    inner = shp.polar(g, lx, ly, lambda t, r=rad - 0.04, p=phase: r * (1 + 0.08 * np.cos(3 * t + p)))
    c.paint(ORGAN, 0.8 * ring * (1 - inner))
  c.paint(BACKGROUND, shp.ellipse(g, lx, ly, 0.24, 0.22, soft=5))
  r = np.hypot(g.u - lx, g.v - ly)
  return Layout(c, {"wall": ((r > 0.35) & (r < 0.95)).astype(np.float32)}, "wall", 0.12)


def bladder(rng, g) -> Layout:
  c = Canvas(g)
  c.paint(SOFT, np.ones_like(g.u))
  lx, ly = _j(rng, 0.3), _j(rng, 0.3)
  c.paint(BACKGROUND, 0.45 * shp.ellipse(g, lx, ly, 0.5, 0.45, soft=14))
  for _ in range(int(rng.integers(3, 6))):                                          # mucosal vessels
    steps = rng.normal(0, 0.18, (7, 2)).cumsum(axis=0)
    c.paint(BLOOD, 0.85 * shp.polyline(g, rng.uniform(-0.8, 0.8, 2) + steps, 0.008 + 0.3 * g.px))
  r = np.hypot(g.u - lx, g.v - ly)
  return Layout(c, {"wall": ((r > 0.3) & (np.abs(g.u) < 0.85) & (np.abs(g.v) < 0.85)).astype(np.float32)},
                "wall", 0.12)


def fundus(rng, g) -> Layout:
  c = Canvas(g)
  disc_side = 1 if rng.random() < 0.5 else -1                                       # left or right eye
  eye = shp.ellipse(g, 0, 0, 0.92, 0.92)
  c.paint(SOFT, eye)
  dx, dy = disc_side * (0.45 + _j(rng, 0.03)), _j(rng, 0.05)
  macula = shp.ellipse(g, dx - disc_side * 0.5, dy, 0.14, 0.14, soft=5)
  c.paint(ORGAN, 0.7 * macula)
  disc = shp.ellipse(g, dx, dy, 0.12, 0.14)
  c.paint(DENSE, disc)
  for sign in (-1, 1):                                                              # vessel arcades
    for spread in (0.35, 0.6):
      t = np.linspace(0, 1, 8)[:, None]
      pts = np.hstack([dx - disc_side * t * 1.0, dy + sign * spread * np.sin(t * 2.2)])
      pts += rng.normal(0, 0.015, pts.shape)
      c.paint(BLOOD, 0.9 * eye * shp.polyline(g, pts, 0.012 + 0.3 * g.px))
  return Layout(c, {"retina": eye * (1 - disc) * shp.ellipse(g, 0, 0, 0.8, 0.8), "disc": disc,
                    "macula": macula}, "retina", 0.1)


def cell(rng, g) -> Layout:
  """A field of 5-9 non-overlapping cells; `cells` holds their centres and radii (nuclei come later)."""
  c = Canvas(g)
  want, cells = int(rng.integers(5, 10)), []
  for _ in range(200):
    if len(cells) == want:
      break
    x, y, r = rng.uniform(-0.75, 0.75), rng.uniform(-0.75, 0.75), rng.uniform(0.17, 0.22)
    if all(np.hypot(x - a, y - b) > r + rc + 0.03 for a, b, rc in cells):
      cells.append((x, y, r))
  mask = np.zeros_like(g.u)
  for x, y, r in cells:
    m = shp.polar(g, x, y, lambda t, r=r, p=rng.uniform(0, 6.3): r * (1 + 0.06 * np.cos(2 * t + p)))
    mask = np.maximum(mask, m)
  c.paint(SOFT, mask)
  return Layout(c, {"cells": mask}, "cells", 0.2, cells=np.array(cells, np.float32))


def retina(rng, g) -> Layout:
  c = Canvas(g)
  base, tilt = -0.3 + _j(rng, 0.08), _j(rng, 0.08)
  surface = base + tilt * g.u + 0.1 * g.u ** 2 + 0.13 * np.exp(-(g.u / 0.18) ** 2)   # foveal pit
  depth = g.v - surface
  e = g.edge(1.0)
  for top, bottom, tissue, alpha in ((0.0, 0.07, ORGAN, 1.0), (0.07, 0.2, SOFT, 1.0), (0.2, 0.26, ORGAN, 0.9),
                                     (0.26, 0.38, SOFT, 1.0), (0.38, 0.44, DENSE, 1.0), (0.44, 0.8, SOFT, 0.6)):
    band = shp.sigmoid_inside(top - depth, e) * shp.sigmoid_inside(depth - bottom, e)
    c.paint(tissue, alpha * band)
  between = lambda a, b: ((depth > a) & (depth < b) & (np.abs(g.u) < 0.85)).astype(np.float32)
  return Layout(c, {"layers": between(0.02, 0.36), "inner": between(0.08, 0.3), "rpe": between(0.34, 0.42)},
                "layers", 0.09)


def cervix(rng, g) -> Layout:
  c = Canvas(g)
  c.paint(SOFT, np.ones_like(g.u))
  cx, cy = _j(rng, 0.1), _j(rng, 0.1)
  body = shp.ellipse(g, cx, cy, 0.7 + _j(rng, 0.05), 0.6 + _j(rng, 0.05), soft=3)
  c.paint(ORGAN, body)
  os_ = shp.ellipse(g, cx, cy, 0.13, 0.05, angle=_j(rng, 0.3))
  c.paint(BACKGROUND, os_)
  for _ in range(int(rng.integers(0, 3))):                                          # mucus
    c.paint(FLUID, 0.5 * shp.ellipse(g, cx + _j(rng, 0.4), cy + _j(rng, 0.4), 0.08, 0.05))
  return Layout(c, {"cervix": body * (1 - shp.ellipse(g, cx, cy, 0.2, 0.1))}, "cervix", 0.12)


def thyroid(rng, g) -> Layout:
  """An axial neck slice: the trachea (air) in the middle, a thyroid lobe either side, carotids lateral."""
  c = Canvas(g)
  dx, dy = _j(rng, 0.05), _j(rng, 0.05)
  c.paint(SOFT, shp.ellipse(g, dx, dy + 0.1, 0.95, 0.8, soft=3))
  lobes = np.zeros_like(g.u)
  for side in (-1, 1):
    lobe = shp.ellipse(g, dx + side * (0.34 + _j(rng, 0.03)), dy, 0.26 + _j(rng, 0.02), 0.36, angle=side * 0.3)
    lobes = np.maximum(lobes, lobe)
    c.paint(BLOOD, shp.ellipse(g, dx + side * 0.72, dy + 0.05, 0.09, 0.09))          # carotid artery
  lobes = np.maximum(lobes, shp.box(g, dx, dy - 0.22, 0.2, 0.07))                    # isthmus
  c.paint(ORGAN, lobes)
  trachea = shp.ellipse(g, dx, dy - 0.02, 0.16, 0.15)
  c.paint(DENSE, trachea)
  c.paint(BACKGROUND, shp.ellipse(g, dx, dy - 0.02, 0.12, 0.11))
  c.paint(DENSE, shp.ellipse(g, dx, dy + 0.62, 0.16, 0.12))                          # vertebral body
  return Layout(c, {"lobes": lobes * (1 - trachea)}, "lobes", 0.1)


def liver(rng, g) -> Layout:
  """An axial upper-abdomen slice: the liver fills the patient's right (image left), spine and aorta behind."""
  c = Canvas(g)
  dy = _j(rng, 0.05)
  c.paint(SOFT, shp.ellipse(g, 0.0, dy + 0.05, 0.95, 0.76))
  lx = -0.28 + _j(rng, 0.04)
  liver_mask = shp.polar(g, lx, dy - 0.02, lambda t, p=rng.uniform(0, 6.3): 0.52 * (1 + 0.12 * np.cos(2 * t + p)))
  c.paint(ORGAN, liver_mask)
  c.paint(FLUID, shp.ellipse(g, 0.45, dy - 0.15, 0.2, 0.16))                         # stomach
  c.paint(DENSE, shp.ellipse(g, 0.0, dy + 0.55, 0.13, 0.11))                         # vertebra
  c.paint(BLOOD, shp.ellipse(g, 0.1, dy + 0.35, 0.06, 0.06))                         # aorta
  # Lesions sit inside the parenchyma, away from its edge.
  return Layout(c, {"liver": liver_mask * shp.ellipse(g, lx, dy - 0.02, 0.4, 0.4)}, "liver", 0.1)


def outlier(rng, g) -> Layout:
  """Not an image of the area at all (wrong view, artefact): random tissue patches."""
  c = Canvas(g)
  fields = np.stack([shp.smooth_noise(rng, g, 4) for _ in range(3)])
  tissues = rng.choice(np.arange(1, 7), 3, replace=False)
  top = fields.argmax(axis=0)
  for k, t in enumerate(tissues):
    c.paint(int(t), (top == k).astype(np.float32))
  return Layout(c, {"all": np.ones_like(g.u)}, "all", 0.12)


AREAS: dict[str, Callable[[np.random.Generator, shp.Grid], Layout]] = {
    "Lung": lung, "Chest": chest, "Brain": brain, "Kidney": kidney, "Bones": bones, "Breast": breast,
    "Skin": skin, "Mouth": mouth, "Intestine": intestine, "Bladder": bladder, "Fundus": fundus,
    "Cell": cell, "Retina": retina, "Cervix": cervix,
    # Only detection subsets image these two areas (44 US-Thyroid, 46 MRI-Liver).
    "Thyroid": thyroid, "Liver": liver,
}
