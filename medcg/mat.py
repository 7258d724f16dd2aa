"""MAT vocabulary and the Med-MAT subset registry.

Every Med-MAT sample carries a (Modality, Anatomical area, Task) triplet. The 53 subsets below are
Table 17 of arXiv 2412.20070 (= the Med-MAT README), with ID/OOD status from Tables 1-2 and source
dataset numbers from Table 17. The coarse CG task is the task token the CG tables use (State, Cancer,
COVID, Diseases, Level, Recognition, Quality, Det); it is inferred from how Tables 3 and 10 use each
subset, and `task_tags` lists every token a subset is used under (03 is "COVID" in row 15 and
"State" in row 2 of Table 3).

The paper counts 13 related : 11 unrelated ID subsets for target 03 and 11 : 13 for target 28 (Fig. 4)
without giving its rule. No element rule that keeps Table 3's direction types intact reproduces both
counts (treating CT and X-ray as one modality gives 13:11 for 03 but 13:11 for 28 too), so medcg uses
the plain rule: share the modality, the area, or a task tag. That gives 6 : 18 for 03 and 10 : 14 for 28.

Modalities bound to one area (Der-Skin, DP-Mouth, FP-Fundus, Mic-Cell, OCT-Retina) form a single
"modality-area pair" element for the fourth CG direction type.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable

MODALITIES = ("Co", "CT", "Der", "DP", "End", "FP", "Mic", "MRI", "OCT", "US", "X-ray")
MODALITY_NAMES = {
    "Co": "Colposcopy", "CT": "Computed Tomography", "Der": "Dermoscopy", "DP": "Digital Photography",
    "End": "Endoscopy", "FP": "Fundus Photography", "Mic": "Microscopy", "MRI": "Magnetic Resonance Imaging",
    "OCT": "Optical Coherence Tomography", "US": "Ultrasound", "X-ray": "X-ray",
}
# 14 classification areas; Thyroid and Liver appear only in detection subsets.
AREAS = ("Cervix", "Kidney", "Lung", "Brain", "Skin", "Mouth", "Intestine", "Bladder", "Fundus", "Cell",
         "Retina", "Breast", "Bones", "Chest", "Thyroid", "Liver")
COARSE_TASKS = ("Quality", "COVID", "Cancer", "State", "Level", "Diseases", "Recognition", "Det", "Seg")
# Modalities that only ever image one area: the pair is one element (CG direction type 4).
MODALITY_AREA_PAIRS = {"Der": "Skin", "DP": "Mouth", "FP": "Fundus", "Mic": "Cell", "OCT": "Retina"}

ELEMENT_KINDS = ("modality", "area", "task")


@dataclasses.dataclass(frozen=True)
class Subset:
  """One Med-MAT subset: a MAT triplet and where its data comes from."""
  id: int
  modality: str
  area: str
  task: str                     # the paper's task description (Table 17)
  coarse_task: str              # the CG task token (inferred, see module docstring)
  status: str                   # "ID" | "OOD" (classification), "det" | "seg"
  sources: tuple[int, ...]      # source dataset numbers 1..109
  task_tags: frozenset[str] = frozenset()  # every CG task token the subset is used under
  multi_label: bool = False

  @property
  def name(self) -> str:
    return f"Subset--{self.id:02d}"

  @property
  def triplet(self) -> tuple[str, str, str]:
    return (self.modality, self.area, self.coarse_task)

  @property
  def is_classification(self) -> bool:
    return self.status in ("ID", "OOD")

  @property
  def pair(self) -> str | None:
    """The modality-area pair element ("Der-Skin"), if the modality is bound to this area."""
    if MODALITY_AREA_PAIRS.get(self.modality) == self.area:
      return f"{self.modality}-{self.area}"
    return None

  def __str__(self) -> str:
    return f"{self.id:02d} {self.modality} {self.area} {self.coarse_task}"


def _s(id_, m, a, task, coarse, status, sources, tags=(), multi=False):
  return Subset(id_, m, a, task, coarse, status, tuple(sources), frozenset({coarse, *tags}), multi)


_SUBSETS = (
    _s(1, "Co", "Cervix", "Cervical Picture Quality Evaluation", "Quality", "OOD", [1]),
    _s(2, "CT", "Kidney", "Kidney Diseases Classification", "Diseases", "ID", [2]),
    _s(3, "CT", "Lung", "COVID-19 Classification", "COVID", "ID", [3, 4, 6], tags=["State"]),
    _s(4, "CT", "Lung", "Lung Cancer Classification", "Cancer", "OOD", [5]),
    _s(5, "CT", "Brain", "Brain Hemorrhage Classification", "State", "OOD", [7]),
    _s(6, "CT", "Brain", "Brain Cancer Classification", "Cancer", "OOD", [8]),
    _s(7, "Der", "Skin", "Melanoma Type Classification", "Cancer", "ID", [10]),
    _s(8, "Der", "Skin", "Skin Diseases Classification", "Diseases", "ID", [9, 11, 12, 13, 14, 15, 71, 72, 74]),
    _s(9, "DP", "Mouth", "Teeth Condition Classification", "State", "ID", [16]),
    _s(10, "DP", "Mouth", "Oral Cancer Classification", "Cancer", "OOD", [17]),
    _s(11, "End", "Intestine", "Intestine Cleanliness Level", "Level", "ID", [18]),
    _s(12, "End", "Bladder", "Cancer Degree Classification", "Level", "OOD", [19], tags=["Cancer"]),
    _s(13, "End", "Intestine", "Intestine Diseases Classification", "Diseases", "ID", [20]),
    _s(14, "FP", "Fundus", "Eye Diseases Classification", "Diseases", "ID", [21, 22, 23, 26, 27, 28, 31, 32, 75]),
    _s(15, "FP", "Fundus", "Multiple-labels Eye Diseases Classification", "Diseases", "ID", [24, 25, 68], multi=True),
    _s(16, "FP", "Fundus", "Blindness Level", "Level", "ID", [29]),
    _s(17, "FP", "Fundus", "Retinal Images Quality Evaluation", "Quality", "OOD", [30]),
    _s(18, "Mic", "Cell", "Cell Type Classification", "Recognition", "ID", [33, 36, 37, 38, 39, 40, 41, 44, 65, 70]),
    _s(19, "Mic", "Cell", "Prostate Cancer Degree Classification", "Level", "ID", [34]),
    _s(20, "Mic", "Cell", "Multiple-labels Blood Cell Classification", "Recognition", "OOD", [35], multi=True),
    _s(21, "Mic", "Cell", "Cancer Classification", "Cancer", "ID", [42, 67]),
    _s(22, "MRI", "Brain", "Head Diseases Classification", "Diseases", "ID", [44, 45]),
    _s(23, "OCT", "Retina", "Retina Diseases Classification", "Diseases", "ID", [46, 47]),
    _s(24, "US", "Breast", "Breast Cancer Classification", "Cancer", "OOD", [48]),
    _s(25, "X-ray", "Bones", "Degree Classification of Knee", "Level", "ID", [49, 53]),
    _s(26, "X-ray", "Bones", "Fractured Classification", "State", "ID", [50, 51]),
    _s(27, "X-ray", "Bones", "Vertebrae Diseases Classification", "Diseases", "OOD", [52]),
    _s(28, "X-ray", "Lung", "COVID-19 and Pneumonia Classification", "COVID", "ID", [54, 55, 56, 57, 60, 62, 81],
       tags=["State"]),
    _s(29, "X-ray", "Breast", "Breast Diseases Classification", "Diseases", "OOD", [58, 78]),
    _s(30, "X-ray", "Lung", "Tuberculosis Classification", "Diseases", "ID", [59, 79]),
    _s(31, "X-ray", "Chest", "Multiple-labels Chest Classification", "Diseases", "ID", [61, 73, 76, 77, 80, 85, 87],
       multi=True),
    _s(32, "X-ray", "Brain", "Tumor Classification", "State", "ID", [63], tags=["Cancer"]),
    _s(33, "Mic", "Cell", "Multi-labels Diseases Classification", "Recognition", "ID", [84], multi=True),
    _s(34, "FP", "Fundus", "Level Identification", "Level", "OOD", [66]),
    _s(35, "X-ray", "Bones", "Level Identification", "Level", "ID", [69]),
    _s(36, "X-ray", "Bones", "Spinal lesion Classification", "Diseases", "ID", [86]),
    _s(37, "X-ray", "Breast", "Multi-labels Diseases", "Diseases", "ID", [82], multi=True),
    # Detection / segmentation (not released; SynthMAT provides synthetic detection data).
    _s(38, "Der", "Skin", "Lesion Det/Seg", "Det", "det", [88, 89, 90, 91]),
    _s(39, "End", "Intestine", "PolyP Det/Seg", "Det", "det", [92, 93]),
    _s(40, "End", "Intestine", "Surgical Procedures Det/Seg", "Det", "det", [94]),
    _s(41, "End", "Intestine", "Multi-labels Det/Seg", "Det", "det", [95]),
    _s(42, "Mic", "Cell", "Cancer Cell Det/Seg", "Det", "det", [96]),
    # Table 17 says "Chest" for 43 although its source (BUSI) is breast ultrasound; kept as published.
    _s(43, "US", "Chest", "Cancer Det/Seg", "Det", "det", [97]),
    _s(44, "US", "Thyroid", "Thyroid Nodule Region Det/Seg", "Det", "det", [98]),
    _s(45, "MRI", "Intestine", "Multi-labels Det/Seg", "Det", "det", [103]),
    _s(46, "MRI", "Liver", "Liver Det/Seg", "Det", "det", [104, 105]),
    _s(47, "X-ray", "Lung", "Lung Det/Seg", "Det", "det", [99]),
    _s(48, "X-ray", "Lung", "Pneumothorax Det/Seg", "Det", "det", [106]),
    _s(49, "X-ray", "Bones", "Spinal Anomaly Det", "Det", "det", [100]),
    _s(50, "X-ray", "Chest", "Multi-labels Det", "Det", "det", [101, 102]),
    _s(51, "FP", "Fundus", "Vessel Seg", "Seg", "seg", [107]),
    _s(52, "FP", "Fundus", "Optic Disc and Cup Seg", "Seg", "seg", [108]),
    _s(53, "FP", "Fundus", "Optic Disc Seg", "Seg", "seg", [109]),
)

SUBSETS: dict[int, Subset] = {s.id: s for s in _SUBSETS}
ID_SUBSETS = tuple(s.id for s in _SUBSETS if s.status == "ID")
OOD_SUBSETS = tuple(s.id for s in _SUBSETS if s.status == "OOD")
CLASSIFICATION_SUBSETS = tuple(s.id for s in _SUBSETS if s.is_classification)
DETECTION_SUBSETS = tuple(s.id for s in _SUBSETS if s.status == "det")

_ID_RE = re.compile(r"^(?:(?:ori|Subset)-{1,2})?0*(\d+)$", re.IGNORECASE)


def get(subset: int | str | Subset) -> Subset:
  """Look a subset up by 3, "03", "Subset--03", "Subset-03" or a Subset; unknown ids raise KeyError."""
  if isinstance(subset, Subset):
    return subset
  if isinstance(subset, int):
    sid = subset
  else:
    m = _ID_RE.match(str(subset).strip())
    if not m:
      raise KeyError(f"not a Med-MAT subset id: {subset!r} (expected 1..53, '03' or 'Subset--03')")
    sid = int(m.group(1))
  if sid not in SUBSETS:
    raise KeyError(f"unknown Med-MAT subset {subset!r}: ids run from 1 to {max(SUBSETS)}")
  return SUBSETS[sid]


def elements(subset: int | str | Subset) -> dict[str, str]:
  """The MAT elements of a subset, keyed by kind ("modality", "area", "task")."""
  s = get(subset)
  return {"modality": s.modality, "area": s.area, "task": s.coarse_task}


def shared_elements(a: int | str | Subset, b: int | str | Subset) -> set[str]:
  """Which element kinds two subsets share. Tasks match when their task tags intersect.

  A shared modality-area pair ("Der-Skin") shows up as both "modality" and "area", plus "pair".
  """
  sa, sb = get(a), get(b)
  out = set()
  if sa.modality == sb.modality:
    out.add("modality")
  if sa.area == sb.area:
    out.add("area")
  if sa.task_tags & sb.task_tags:
    out.add("task")
  if sa.pair is not None and sa.pair == sb.pair:
    out.add("pair")
  return out


def _pool(statuses: Iterable[str]) -> list[Subset]:
  statuses = set(statuses)
  return [s for s in _SUBSETS if s.status in statuses]


def sharing(target: int | str | Subset, kind: str | None = None, statuses=("ID",)) -> list[int]:
  """Subsets (other than the target) sharing any element, or the element `kind`, with the target."""
  t = get(target)
  if kind is not None and kind not in ELEMENT_KINDS + ("pair",):
    raise ValueError(f"unknown element kind {kind!r}; expected one of {ELEMENT_KINDS + ('pair',)}")
  out = []
  for s in _pool(statuses):
    if s.id == t.id:
      continue
    shared = shared_elements(t, s)
    if (kind is None and shared) or (kind is not None and kind in shared):
      out.append(s.id)
  return out


def not_sharing(target: int | str | Subset, statuses=("ID",)) -> list[int]:
  """Subsets sharing no MAT element with the target (the Baseline+ "unrelated" pool)."""
  t = get(target)
  return [s.id for s in _pool(statuses) if s.id != t.id and not shared_elements(t, s)]


def find(modality: str | None = None, area: str | None = None, task: str | None = None,
         statuses=("ID", "OOD")) -> list[int]:
  """Subsets matching the given elements; `task` matches any task tag."""
  return [s.id for s in _pool(statuses)
          if (modality is None or s.modality == modality)
          and (area is None or s.area == area)
          and (task is None or task in s.task_tags)]
