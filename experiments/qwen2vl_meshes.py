"""tiny-qwen2vl (the preset itself, 112 px SynthMAT) trained 5 steps on 1 device, fsdp=8 and fsdp=4 x tensor=2.

    XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false" \
        python -m experiments.qwen2vl_meshes        # needs data/synthmat112_shards (python -m medcg.demo --model tiny-qwen2vl)

CI checks the same at a micro size (tests/test_train_qwen.py); this is the full preset. Prints the losses and the
largest difference from one device, writes experiments/results/qwen2vl_meshes.json.
"""
from __future__ import annotations

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from configs import models  # noqa: E402
from medcg import configlib  # noqa: E402
from medcg import fileio  # noqa: E402
from medcg.train import trainer  # noqa: E402

SHARDS = "data/synthmat112_shards"
MESHES = {"one device": None, "fsdp=8": (1, 8, 1), "fsdp=4 x tensor=2": (1, 4, 2)}


def config(mesh):
  c = configlib.base_config()
  c.data.shards_dir = SHARDS
  c.data.mixture = [(5, "train", 64), (28, "train", 64)]
  c.data.eval_mixture = [(3, "test", 8)]
  c.data.image_size, c.data.seq_len, c.data.batch_size, c.data.truncation = 112, 112, 32, "question"
  c.data.tokenizer.update(dict(kind="hf", path=os.path.join(SHARDS, "tokenizer-bpe512.json"), bos="<s>",
                               eos="</s>", pad="<pad>", image="<image>"))
  c.model = models.get("tiny-qwen2vl")
  c.train.update(dict(steps=5, lr=2e-3, warmup_steps=1, log_every=1))
  c.checkpoint.async_save = False
  if mesh is None:
    c.mesh.num_devices = 1
  else:
    c.mesh.update(dict(data=mesh[0], fsdp=mesh[1], tensor=mesh[2]))
  return c


def main() -> None:
  losses = {}
  root = tempfile.mkdtemp(prefix="qwen2vl_meshes_")
  try:
    for i, (name, mesh) in enumerate(MESHES.items()):
      losses[name] = trainer.train(config(mesh), os.path.join(root, str(i)), evaluate_fn=lambda m, s: {}).losses
  finally:
    shutil.rmtree(root, ignore_errors=True)
  ref = np.array(losses["one device"])
  rows = [{"mesh": k, "losses": v, "max_abs_diff_vs_one_device": float(np.max(np.abs(np.array(v) - ref)))}
          for k, v in losses.items()]
  print("| mesh | losses (5 steps) | max abs diff vs one device |\n|---|---|---|")
  for r in rows:
    print(f"| {r['mesh']} | {' '.join(f'{x:.6f}' for x in r['losses'])} | {r['max_abs_diff_vs_one_device']:.2e} |")
  out = os.path.join(os.path.dirname(__file__), "results", "qwen2vl_meshes.json")
  fileio.atomic_write_json(out, {"command": "python -m experiments.qwen2vl_meshes", "rows": rows})
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
