"""medcg: compositional generalisation of multimodal LLMs on medical images (Med-MAT), in JAX."""
__version__ = "0.1.0"
