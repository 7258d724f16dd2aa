"""Vectorised 2-D drawing primitives for SynthMAT: soft masks, smooth noise, separable blur.

Everything works on a normalised grid (u to the right, v down, both in [-1, 1]) so that a drawing
looks the same at 32 px and 336 px; masks are anti-aliased with a sigmoid about one pixel wide.
"""
from __future__ import annotations

import functools

import numpy as np


class Grid:
  """Pixel-centre coordinates of an S x S image in [-1, 1]."""

  def __init__(self, size: int):
    if size < 8:
      raise ValueError(f"image_size must be at least 8, got {size}")
    self.size = size
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    self.v, self.u = np.meshgrid(axis, axis, indexing="ij")
    self.px = 2.0 / size                      # one pixel in normalised units

  def edge(self, soft: float = 1.0) -> float:
    return self.px * soft


@functools.lru_cache(maxsize=16)
def grid(size: int) -> Grid:
  return Grid(size)


def sigmoid_inside(signed_dist: np.ndarray, edge: float) -> np.ndarray:
  """1 inside (negative distance), 0 outside, with a linear ramp of width `edge` across the boundary."""
  return np.clip(0.5 - signed_dist / edge, 0.0, 1.0).astype(np.float32)


def ellipse(g: Grid, cx, cy, rx, ry, angle=0.0, soft=1.0) -> np.ndarray:
  du, dv = g.u - cx, g.v - cy
  if angle:
    c, s = np.cos(angle), np.sin(angle)
    du, dv = c * du + s * dv, -s * du + c * dv
  r = np.sqrt((du / rx) ** 2 + (dv / ry) ** 2)
  return sigmoid_inside((r - 1.0) * min(rx, ry), g.edge(soft))


def box(g: Grid, cx, cy, hw, hh, angle=0.0, soft=1.0, corner=0.0) -> np.ndarray:
  """A rectangle of half-sizes (hw, hh), optionally rotated and with rounded corners."""
  du, dv = g.u - cx, g.v - cy
  if angle:
    c, s = np.cos(angle), np.sin(angle)
    du, dv = c * du + s * dv, -s * du + c * dv
  corner = min(corner, hw, hh)
  qu, qv = np.abs(du) - hw + corner, np.abs(dv) - hh + corner
  d = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0)) + np.minimum(np.maximum(qu, qv), 0) - corner
  return sigmoid_inside(d, g.edge(soft))


def polar(g: Grid, cx, cy, radius_of_angle, soft=1.0) -> np.ndarray:
  """A star-shaped region whose boundary radius is `radius_of_angle(theta)`."""
  du, dv = g.u - cx, g.v - cy
  return sigmoid_inside(np.hypot(du, dv) - radius_of_angle(np.arctan2(dv, du)), g.edge(soft))


def polyline(g: Grid, points: np.ndarray, width: float, soft=1.0) -> np.ndarray:
  """A stroke of half-width `width` along the (K, 2) polyline `points` (u, v)."""
  p = np.asarray(points, np.float32)
  a, b = p[:-1, :, None, None], p[1:, :, None, None]         # (K-1, 2, 1, 1)
  ab = b - a
  pu, pv = g.u[None] - a[:, 0], g.v[None] - a[:, 1]
  denom = np.maximum(ab[:, 0] ** 2 + ab[:, 1] ** 2, 1e-12)
  t = np.clip((pu * ab[:, 0] + pv * ab[:, 1]) / denom, 0.0, 1.0)
  d = np.hypot(pu - t * ab[:, 0], pv - t * ab[:, 1]).min(axis=0)
  return sigmoid_inside(d - width, g.edge(soft))


@functools.lru_cache(maxsize=64)
def _upsampler(size: int, cells: int) -> np.ndarray:
  """(size, cells) bilinear interpolation matrix from a coarse lattice to pixel centres."""
  x = (np.arange(size) + 0.5) / size * (cells - 1)
  lo = np.clip(np.floor(x).astype(int), 0, cells - 2)
  frac = (x - lo).astype(np.float32)
  m = np.zeros((size, cells), np.float32)
  m[np.arange(size), lo] = 1.0 - frac
  m[np.arange(size), lo + 1] = frac
  return m


def smooth_noise(rng: np.random.Generator, g: Grid, cells: int = 6) -> np.ndarray:
  """Zero-mean, unit-std low-frequency noise: a random `cells` x `cells` lattice, bilinearly upsampled."""
  m = _upsampler(g.size, cells)
  field = m @ rng.standard_normal((cells, cells)).astype(np.float32) @ m.T
  return (field - field.mean()) / (field.std() + 1e-6)


@functools.lru_cache(maxsize=64)
def _gauss_taps(sigma_px: float) -> np.ndarray:
  radius = max(1, int(np.ceil(3.0 * sigma_px)))
  x = np.arange(-radius, radius + 1, dtype=np.float32)
  k = np.exp(-0.5 * (x / sigma_px) ** 2)
  return (k / k.sum()).astype(np.float32)


def _blur_axis(x: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
  r = len(taps) // 2
  pad = [(0, 0)] * x.ndim
  pad[axis] = (r, r)
  xp = np.pad(x, pad, mode="edge")
  n = x.shape[axis]
  xp = np.moveaxis(xp, axis, 0)
  out = np.zeros_like(xp[:n])
  for i, w in enumerate(taps):
    out += w * xp[i:i + n]
  return np.moveaxis(out, 0, axis)


def blur(x: np.ndarray, sigma_px: float, axes=(0, 1)) -> np.ndarray:
  """Separable Gaussian blur over the two image axes of an (S, S) or (S, S, C) array."""
  if sigma_px < 0.3:
    return x
  taps = _gauss_taps(round(float(sigma_px), 2))
  for axis in axes:
    x = _blur_axis(x, taps, axis)
  return x
