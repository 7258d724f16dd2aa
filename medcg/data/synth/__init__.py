"""SynthMAT, the synthetic Med-MAT: compositional images written in the release's own layout.

Modules, lowest first: shapes (2-D drawing primitives), spec (label sets, finding specs, question templates),
anatomy (one tissue layout per area), imaging (modality image formation: `render`, `render_detection`),
generate (`write_synthmat`: the release's JSON + PNGs), probe (linear probes on raw pixels). The submodules
import each other, never this package; `python -m medcg.data synth` is the command line.
"""
from medcg.data.synth.generate import (DET_LABELS, DET_TEMPLATES, LABELS, SPLITS, TEMPLATES, render,
                                       render_detection, samples, split_labels, write_synthmat)

__all__ = ["LABELS", "TEMPLATES", "DET_LABELS", "DET_TEMPLATES", "render", "render_detection", "write_synthmat",
           "samples", "split_labels", "SPLITS"]
