"""SynthMAT label sets, finding specs and question templates: 37 classification and 13 detection subsets.

Each label maps to the findings that make it true. A finding names only a *shape kind* (round,
spiculated, diffuse, ...), a *tissue* class and where in the area it sits; how that tissue looks is the
modality's business (`imaging`) and where the region is is the area's. So one label word means
one visual concept everywhere: "Malignant" is a spiculated lesion in a CT lung, a breast ultrasound or
a cytology smear, and "Level k" is k-fold more of the area's finding. Label words are shared by subsets
that share a task, so answers can transfer between compositions.

Detection subsets (38-50, `DET_SPECS`) draw one object per image: the area's layout plus one finding
made of the same shape kinds and tissues, so a polyp to box looks like the "Polyp" of classification
subset 13 and a skin lesion like a lesion of subsets 07-08. The answer is the object's tight box.
"""
from __future__ import annotations

import dataclasses

from medcg import mat

# Tissue classes the areas and findings paint with; every modality has a look for each.
BACKGROUND, SOFT, ORGAN, FLUID, DENSE, BLOOD, LESION = range(7)
NUM_TISSUES = 7


@dataclasses.dataclass(frozen=True)
class Finding:
  """One kind of abnormality, independent of modality.

  kind: shape primitive (see `imaging.FINDING_KINDS`); tissue: class it paints; size: radius as a
  multiple of the area's finding scale; count: how many copies; region: the area's named region the
  sites are drawn from (None = the area's default); nucleus: for cell areas, replaces the cells' nucleus
  shape instead of adding a lesion (cell-type recognition); strength: paint opacity.
  """
  kind: str
  tissue: int = LESION
  size: float = 1.0
  count: int = 1
  region: str | None = None
  nucleus: bool = False
  strength: float = 1.0


F = Finding
QUALITY = ("Good", "Bad", "Outlier")      # Quality labels are image-formation changes, not findings
NONE: tuple[Finding, ...] = ()


def _levels(n: int, finding: Finding, mode: str = "count") -> dict[str, tuple[Finding, ...]]:
  """Level k = k times the finding: k copies (`count`) or a k-graded radius (`size`); Level 0 = none."""
  out = {}
  for k in range(n):
    if k == 0:
      out["Level 0"] = NONE
    elif mode == "count":
      out[f"Level {k}"] = (dataclasses.replace(finding, count=finding.count * k),)
    else:
      out[f"Level {k}"] = (dataclasses.replace(finding, size=finding.size * (0.4 + 0.5 * k)),)
  return out


def _multi(single: dict[str, tuple[Finding, ...]], combos: tuple[tuple[str, ...], ...]):
  """Adds comma-joined multi-label captions ("Mass, Calcification") made of single labels."""
  out = dict(single)
  for combo in combos:
    out[", ".join(combo)] = tuple(f for name in combo for f in single[name])
  return out


_BENIGN = (F("round", LESION, 0.9),)
_MALIGNANT = (F("spiculated", LESION, 1.0),)
_COLLAPSE = (F("patchy", SOFT, 0.8, strength=0.8),)   # a vertebra losing bone density and height
_RETINA_DR = (F("dot", BLOOD, 0.35, count=4), F("dot", FLUID, 0.3, count=3))
_RETINA_GLAUCOMA = (F("round", FLUID, 0.9, region="disc"),)
_RETINA_CATARACT = (F("diffuse", FLUID, strength=0.6),)
_CELL_TYPES = {
    "Lymphocyte": (F("round", ORGAN, 0.75, nucleus=True),),
    "Neutrophil": (F("lobed", ORGAN, 0.7, nucleus=True),),
    "Monocyte": (F("bean", ORGAN, 0.75, nucleus=True),),
    "Eosinophil": (F("bilobed", ORGAN, 0.7, nucleus=True), F("granules", BLOOD, 0.9, nucleus=True)),
    "Basophil": (F("round", LESION, 0.7, nucleus=True), F("granules", LESION, 0.9, nucleus=True)),
}
_CHEST = {
    "Normal": NONE,
    "Cardiomegaly": (F("round", ORGAN, 1.8, region="heart"),),
    "Effusion": (F("patchy", FLUID, 1.3, region="base"),),
    "Nodule": (F("round", LESION, 0.45),),
}
_MAMMO = {
    "Normal": NONE,
    "Mass": (F("round", LESION, 0.9),),
    "Calcification": (F("cluster", DENSE, 0.3),),
    "Asymmetry": (F("patchy", ORGAN, 1.2),),
}
_FUNDUS = {
    "Normal": NONE,
    "Diabetic retinopathy": _RETINA_DR,
    "Glaucoma": _RETINA_GLAUCOMA,
    "Cataract": _RETINA_CATARACT,
}
_PROTEIN = {
    "Nucleoplasm": (F("round", BLOOD, 0.55, nucleus=True),),
    "Cytosol": (F("ring", BLOOD, 1.0, nucleus=True), F("round", ORGAN, 0.45, nucleus=True)),
    "Mitochondria": (F("granules", BLOOD, 1.0, nucleus=True), F("round", ORGAN, 0.45, nucleus=True)),
    "Nucleoli": (F("round", ORGAN, 0.55, nucleus=True), F("nucleoli", BLOOD, 0.5, nucleus=True)),
}
_BLOOD_CELLS = {k: _CELL_TYPES[k] for k in ("Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil")}

# label -> findings, per subset, in a fixed label order.
SPECS: dict[int, dict[str, tuple[Finding, ...]]] = {
    1: {q: NONE for q in QUALITY},
    2: {"Normal": NONE, "Cyst": (F("round", FLUID, 0.9),), "Tumor": (F("spiculated", LESION, 1.1),),
        "Stone": (F("dot", DENSE, 0.5),)},
    3: {"Normal": NONE, "COVID-19": (F("diffuse", LESION),)},
    4: {"Normal": NONE, "Benign": _BENIGN, "Malignant": _MALIGNANT,
        "Metastasis": (F("round", LESION, 0.45, count=4),)},
    5: {"Normal": NONE, "Hemorrhage": (F("round", BLOOD, 1.0),)},
    6: {"Normal": NONE, "Benign": _BENIGN, "Malignant": _MALIGNANT},
    7: {"Benign": (F("round", LESION, 1.0),), "Malignant": (F("spiculated", LESION, 1.0),)},
    8: {"Nevus": (F("round", LESION, 0.9),), "Melanoma": (F("spiculated", LESION, 1.1),),
        "Basal cell carcinoma": (F("ring", BLOOD, 1.0),), "Seborrheic keratosis": (F("texture", LESION, 1.1),),
        "Monkeypox": (F("cluster", FLUID, 0.35),)},
    9: {"Normal": NONE, "Caries": (F("dot", LESION, 0.6, count=2, region="teeth"),),
        "Gingivitis": (F("diffuse", BLOOD, region="gums"),), "Ulcer": (F("ring", FLUID, 0.7, region="gums"),)},
    10: {"Benign": (F("round", LESION, 1.4, region="gums"),),
         "Malignant": (F("spiculated", LESION, 1.5, region="gums"),)},
    11: _levels(4, F("round", FLUID, 0.7, count=2)),
    12: _levels(4, F("spiculated", LESION, 1.0), mode="size"),
    13: {"Normal": NONE, "Polyp": (F("round", LESION, 0.9),), "Ulcerative colitis": (F("diffuse", BLOOD),),
         "Esophagitis": (F("line", BLOOD, 1.0, count=3),)},
    14: {**_FUNDUS, "Age-related macular degeneration": (F("cluster", LESION, 0.35, region="macula"),)},
    15: _multi(_FUNDUS, (("Diabetic retinopathy", "Glaucoma"), ("Glaucoma", "Cataract"))),
    16: _levels(5, F("dot", BLOOD, 0.55, count=2)),
    17: {q: NONE for q in QUALITY},
    18: _CELL_TYPES,
    19: _levels(4, F("spiculated", LESION, 0.6, count=2)),
    20: _multi(_BLOOD_CELLS, (("Eosinophil", "Lymphocyte"), ("Lymphocyte", "Neutrophil"),
                              ("Monocyte", "Neutrophil"))),
    21: {"Benign": (F("round", LESION, 0.6, count=4),), "Malignant": (F("spiculated", LESION, 0.7, count=4),)},
    22: {"Normal": NONE, "Glioma": (F("spiculated", LESION, 1.1),),
         "Meningioma": (F("round", LESION, 0.9, region="periphery"),),
         "Pituitary tumor": (F("round", LESION, 0.5, region="sella"),)},
    23: {"Normal": NONE, "CNV": (F("round", DENSE, 0.8, region="rpe"),),
         "DME": (F("round", FLUID, 0.6, count=2, region="inner"),),
         "Drusen": (F("dot", DENSE, 0.45, count=4, region="rpe"),)},
    24: {"Normal": NONE, "Benign": _BENIGN, "Malignant": _MALIGNANT},
    25: _levels(5, F("dot", DENSE, 0.5, count=2, region="joint")),
    26: {"Normal": NONE, "Fracture": (F("line", SOFT, 1.2, region="shaft"),)},
    27: {"Normal": NONE, "Osteophytes": (F("dot", DENSE, 0.4, count=4, region="joint"),),
         "Vertebral collapse": _COLLAPSE},
    28: {"Normal": NONE, "COVID-19": (F("diffuse", LESION),), "Pneumonia": (F("patchy", LESION, 1.2, region="base"),)},
    29: {"Normal": NONE, "Mass": _MAMMO["Mass"], "Calcification": _MAMMO["Calcification"]},
    30: {"Normal": NONE, "Tuberculosis": (F("ring", LESION, 0.8, region="upper"),
                                          F("cluster", LESION, 0.3, region="upper"))},
    31: _multi(_CHEST, (("Cardiomegaly", "Effusion"), ("Effusion", "Nodule"))),
    32: {"Normal": NONE, "Tumor": (F("round", LESION, 1.0),)},
    33: _multi(_PROTEIN, (("Nucleoplasm", "Nucleoli"),)),
    34: _levels(5, F("dot", BLOOD, 0.55, count=2)),
    35: _levels(4, F("round", DENSE, 0.5, region="joint"), mode="size"),
    36: {"Normal": NONE, "Osteophytes": (F("dot", DENSE, 0.4, count=4, region="joint"),),
         "Surgical implant": (F("bar", DENSE, 1.2, region="joint"),),
         "Vertebral collapse": _COLLAPSE},
    37: _multi(_MAMMO, (("Mass", "Calcification"), ("Calcification", "Asymmetry"))),
}

LABELS: dict[int, tuple[str, ...]] = {sid: tuple(spec) for sid, spec in SPECS.items()}

# How each subset's images are named in questions, and what the question asks about.
_IMAGE_NOUN = {
    "CT": "CT scan", "MRI": "MRI scan", "X-ray": "X-ray", "US": "ultrasound image", "FP": "fundus photograph",
    "Mic": "microscopy image", "Der": "dermoscopy image", "End": "endoscopy image", "OCT": "OCT scan",
    "DP": "intraoral photograph", "Co": "colposcopy image",
}
_AREA_ADJ = {
    "Cervix": "cervical", "Kidney": "kidney", "Lung": "lung", "Brain": "brain", "Skin": "skin", "Mouth": "oral",
    "Intestine": "intestinal", "Bladder": "bladder", "Fundus": "fundus", "Cell": "cell", "Retina": "retinal",
    "Breast": "breast", "Bones": "bone", "Chest": "chest", "Thyroid": "thyroid", "Liver": "liver",
}
_SUBJECT = {
    1: "image quality", 2: "kidney condition", 3: "COVID-19 status", 4: "type of lung lesion",
    5: "presence of a hemorrhage", 6: "type of brain lesion", 7: "type of skin lesion", 8: "skin disease",
    9: "condition of the teeth and gums", 10: "type of oral lesion", 11: "bowel cleanliness level",
    12: "cancer degree of the bladder tissue", 13: "intestinal disease", 14: "eye disease", 15: "eye diseases",
    16: "blindness level", 17: "image quality", 18: "cell type", 19: "cancer degree of the prostate tissue",
    20: "blood cell types", 21: "type of the cells", 22: "head disease", 23: "retinal disease",
    24: "type of breast lesion", 25: "knee osteoarthritis level", 26: "presence of a fracture",
    27: "vertebral disease", 28: "lung condition", 29: "breast disease", 30: "tuberculosis status",
    31: "chest findings", 32: "presence of a tumor", 33: "protein localisation patterns", 34: "diabetic retinopathy level",
    35: "bone development level", 36: "spinal lesion", 37: "breast findings",
}
# Real release templates where known (reference/medmat.md §1.2), used as each subset's first template.
_REAL = {
    2: "Review this kidney CT scan and determine the possible condition it represents.",
    5: ("Please analyze this brain CT scan and determine if there is a hemorrhage. "
        "Reply 'Hemorrhage' if found, or 'Normal' if absent."),
}
_PATTERNS = {
    "single": (
        "Review this {img} and determine the possible {subject} it represents.",
        "What is the {subject} shown in this {img}?",
        "Please analyze this {img} and identify the {subject}.",
        "Based on the {img}, which option best describes the {subject}?",
        "Examine this {img} carefully. What {subject} does it indicate?",
        "As a radiologist reading this {img}, classify the {subject}.",
    ),
    "level": (
        "Please rate the {subject} in this {img} from {first} to {last}.",
        "What is the {subject} shown in this {img}?",
        "Assess this {img} and grade the {subject}.",
        "Based on the {img}, determine the {subject}, where {first} means no finding.",
        "Examine the {img} and report the {subject} on a scale from {first} to {last}.",
        "Grade this {img}: which level best describes the {subject}?",
    ),
    "multi": (
        "Identify the {subject} in this {img}, separating multiple conditions with commas. "
        "If no condition is present, return '{normal}'.",
        "Which {subject} are visible in this {img}? List all that apply, separated by commas.",
        "Please analyze this {img} and report all {subject} present.",
        "Examine the {img} and name every one of the {subject} it shows, comma-separated.",
        "What {subject} can be recognised in this {img}? Give all of them.",
        "Review this {img} and list the {subject}; use commas if there is more than one.",
    ),
    "quality": (
        "Evaluate the {subject} of this {img}: is it Good, Bad or an Outlier?",
        "What is the {subject} of this {img}?",
        "Assess whether this {img} is usable. Rate its {subject}.",
        "Please judge the {subject} of the {img} shown.",
        "Is this {img} of sufficient {subject} for diagnosis? Classify it.",
        "Rate the {subject} of this {img}.",
    ),
}


def _templates(sid: int) -> tuple[str, ...]:
  s = mat.get(sid)
  labels = LABELS[sid]
  img = f"{_AREA_ADJ[s.area]} {_IMAGE_NOUN[s.modality]}"
  if s.multi_label:
    kind = "multi"
  elif labels[0] == "Level 0":
    kind = "level"
  elif labels == QUALITY:
    kind = "quality"
  else:
    kind = "single"
  fields = dict(img=img, subject=_SUBJECT[sid], first=labels[0], last=labels[-1],
                normal="Normal" if "Normal" in labels else labels[0])
  out = [p.format(**fields) for p in _PATTERNS[kind]]
  if sid in _REAL:
    out[0] = _REAL[sid]
  return tuple(out)


TEMPLATES: dict[int, tuple[str, ...]] = {sid: _templates(sid) for sid in SPECS}


def check_specs() -> None:
  """Raises ValueError if the tables disagree with the registry (run by the tests)."""
  classification = set(mat.CLASSIFICATION_SUBSETS)
  if set(SPECS) != classification:
    raise ValueError(f"SynthMAT specs cover {sorted(SPECS)}, registry has {sorted(classification)}")
  for sid, labels in LABELS.items():
    if len(labels) < 2:
      raise ValueError(f"subset {sid:02d}: needs at least 2 labels, has {labels}")
    if len(set(TEMPLATES[sid])) != 6:
      raise ValueError(f"subset {sid:02d}: needs 6 distinct templates")
    if mat.get(sid).multi_label != any(", " in lab for lab in labels):
      raise ValueError(f"subset {sid:02d}: multi-label captions must appear exactly in multi-label subsets")


# ---------------------------------------------------------------------------------------------------
# Detection subsets 38-50: one object per image, answered with its box.


@dataclasses.dataclass(frozen=True)
class DetSpec:
  """The object of a detection subset: its name (the record's caption) and the finding that draws it.

  `finding.region` names where in the area it may sit; regions spanning most of the area give boxes
  at varied positions (the paper picked 38 and 39 as targets because their objects move around).
  """
  name: str
  finding: Finding


DET_SPECS: dict[int, DetSpec] = {
    38: DetSpec("skin lesion", F("spiculated", LESION, 1.0, region="field")),
    39: DetSpec("polyp", F("round", LESION, 1.8)),
    40: DetSpec("surgical instrument", F("bar", DENSE, 1.5)),
    41: DetSpec("bleeding lesion", F("patchy", BLOOD, 1.8)),
    42: DetSpec("cancer cell", F("spiculated", LESION, 0.9)),
    43: DetSpec("tumor", F("round", LESION, 1.8)),
    44: DetSpec("thyroid nodule", F("round", FLUID, 1.6)),
    45: DetSpec("lesion", F("round", LESION, 1.8)),
    46: DetSpec("liver lesion", F("round", LESION, 1.8)),
    47: DetSpec("lung opacity", F("patchy", LESION, 1.8)),
    48: DetSpec("pneumothorax", F("round", FLUID, 1.6, region="upper")),
    49: DetSpec("spinal anomaly", F("spiculated", LESION, 1.3, region="bone")),
    50: DetSpec("nodule", F("round", LESION, 1.4)),
}
DET_LABELS: dict[int, tuple[str, ...]] = {sid: (spec.name,) for sid, spec in DET_SPECS.items()}
BOX_FORMAT = "[x1, y1, x2, y2]"
_DET_PATTERNS = (
    "Locate the {object} in this {img}. Give its bounding box as " + BOX_FORMAT
    + " with coordinates normalised to 0-1.",
    "Where is the {object} in this {img}? Answer with its bounding box " + BOX_FORMAT + ", normalised to 0-1.",
    "Detect the {object} in the {img} and output its bounding box in the form " + BOX_FORMAT + " (0-1).",
    "Please draw a bounding box around the {object} in this {img}; reply with " + BOX_FORMAT
    + " using 0-1 coordinates.",
    "Find the {object} shown in this {img} and return its location as " + BOX_FORMAT + ", each value in 0-1.",
    "As a radiologist reading this {img}, mark the {object} with a bounding box " + BOX_FORMAT
    + " in normalised 0-1 coordinates.",
)


def _det_templates(sid: int) -> tuple[str, ...]:
  s = mat.get(sid)
  img = f"{_AREA_ADJ[s.area]} {_IMAGE_NOUN[s.modality]}"
  return tuple(p.format(object=DET_SPECS[sid].name, img=img) for p in _DET_PATTERNS)


DET_TEMPLATES: dict[int, tuple[str, ...]] = {sid: _det_templates(sid) for sid in DET_SPECS}


def check_det_specs() -> None:
  """Raises ValueError if the detection tables disagree with the registry (run by the tests)."""
  detection = set(mat.DETECTION_SUBSETS)
  if set(DET_SPECS) != detection:
    raise ValueError(f"SynthMAT detection specs cover {sorted(DET_SPECS)}, registry has {sorted(detection)}")
  for sid, templates in DET_TEMPLATES.items():
    if len(set(templates)) != 6 or not all(BOX_FORMAT in t for t in templates):
      raise ValueError(f"subset {sid:02d}: needs 6 distinct templates asking for {BOX_FORMAT}")
