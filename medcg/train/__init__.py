"""medcg training: mesh and logical axis rules, optimizer, train step and loop, checkpoints."""
