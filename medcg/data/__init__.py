"""medcg data: Med-MAT reader, SynthMAT, TFRecord shards, grain pipeline, tokenizers."""
