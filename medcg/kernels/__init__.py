"""medcg kernels: TRIM token reduction (reference and Pallas)."""
