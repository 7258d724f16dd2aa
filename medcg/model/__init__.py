"""medcg models: CLIP towers, decoder LLMs, the LLaVA-style VLM, Hugging Face import."""
