"""Judged pairwise evaluation (MLLM-Bench protocol): per-sample criteria, both orders, local or HTTP
judges, a SQLite judgement cache that makes runs resumable, W/T/L + win rate + Elo reports.

Modules: data (samples, answers), prompts (template + version), protocol (parsing, combination,
metrics), elo, clients (HTTP and local judges), cache, runner (one run), report (outputs),
launch (config -> run), local (a medcg model as judge), __main__ (CLI).
"""
