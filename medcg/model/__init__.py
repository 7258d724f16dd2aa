"""medcg models: CLIP towers, decoder LLMs, the LLaVA-style VLM, Qwen2-VL / Qwen2.5-VL, Hugging Face import.

Public API (imported lazily, so `import medcg.model` stays cheap):

  VLM(cfg, rngs=nnx.Rngs(0), trim=None)   the LLaVA-1.5 model (medcg.model.vlm)
  QwenVLM(cfg, rngs=nnx.Rngs(0))          Qwen2-VL / Qwen2.5-VL (medcg.model.qwen_vl)
  build(cfg, rngs=..., trim=None)          the model of a `model` config section, by `model.family`
  load_hf(path, **kw)                      LlavaForConditionalGeneration -> VLM, Qwen2VL / Qwen2_5_VL
                                           ForConditionalGeneration -> QwenVLM, CLIPModel -> (vision, text),
                                           LlamaForCausalLM / Qwen2ForCausalLM -> LLM
  preset(name), PRESETS                    model config presets (configs/models.py)
  model_flops(cfg, seq_len, ...)           FLOPs per example for MFU
"""
import importlib

_EXPORTS = {
    "VLM": ("medcg.model.vlm", "VLM"),
    "QwenVLM": ("medcg.model.qwen_vl", "QwenVLM"),
    "build": ("medcg.model.vlm", "build"),
    "load_hf": ("medcg.model.vlm", "load_hf"),
    "model_flops": ("medcg.model.vlm", "model_flops"),
    "answer_loss": ("medcg.model.vlm", "answer_loss"),
    "preset": ("configs.models", "get"),
    "PRESETS": ("configs.models", "PRESETS"),
}


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'medcg.model' has no attribute {name!r}")
  module, attr = _EXPORTS[name]
  try:
    return getattr(importlib.import_module(module), attr)
  except ModuleNotFoundError as e:
    if module.startswith("configs"):
      raise ImportError(f"medcg.model.{name} reads the presets in configs/models.py: run from the repository "
                        "root (configs/ must be importable)") from e
    raise


__all__ = sorted(_EXPORTS)
