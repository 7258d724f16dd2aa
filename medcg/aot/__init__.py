"""Ahead-of-time compilation for hardware targets this host does not have (python -m medcg.compile)."""
