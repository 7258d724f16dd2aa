"""medcg data: Med-MAT reader, SynthMAT (medcg.data.synth), TFRecord shards, grain pipeline, tokenizers."""
