"""Judged pairwise evaluation (MLLM-Bench protocol, arXiv 2311.13951) of model answers vs a reference.

Run (HTTP judge; the key is read from the variable named by judge.api_key_env, never from the config):

  export OPENAI_API_KEY=...
  python -m medcg.judge --config configs/judge.py \\
    --config.data.path=MLLM-Bench/data/questions.json --config.data.criteria_path=criteria.json \\
    --config.answers.reference=answers/llava-v1.5-13b.jsonl \\
    --config.answers.candidates=answers/mine.jsonl,answers/other.jsonl --config.workdir=runs/judge1

  # Med-MAT free-form answers, judged by a local LLaVA checkpoint run in medcg (images never leave the machine):
  python -m medcg.judge --config configs/judge.py:data=medmat,judge=local \\
    --config.data.path=med-mat-release/Aggregated_Subsets/Subset--05-train.json \\
    --config.judge.checkpoint=checkpoints/llava-1.5-13b-hf ...

Naming the models: every answers entry is PATH or NAME=PATH (answers.reference too), e.g.
`--config.answers.candidates=run_a=runs/a/eval/step_444/samples.jsonl,run_b=runs/b/eval/step_444/samples.jsonl`.
A file's model name is, first that applies: its NAME=; the model id its records carry (`model`, `model_id`,
`gen_model_id` or `name`; every record that has one must agree); the file name, or the folder for a
`samples.jsonl` (step_444 above). Two files with one name are an error naming both; give them NAME= prefixes.
An entry is NAME=PATH when the text before its first '=' has no '/' (write ./k=v/x.jsonl for such a path).

Compare with MLLM-Bench V3 (anchor LLaVA-v1.5-13B, judge GPT-4-turbo): GPT-4o win rate 0.90,
Claude-3 0.83, GPT-4V 0.70 (reference/evaluation.md §1.6). Rerunning the same command replays cached
judgements (judge_cache.sqlite in the workdir) and only sends what is missing or failed; `--no_cache`
sends everything again.
"""
from medcg import configlib
import ml_collections


def get_config(arg=None):
  """`arg`: data=mllm_bench|medmat, judge=http|local, pairing=reference|all."""
  arg = configlib.parse_arg(arg, data="mllm_bench", judge="http", pairing="reference")
  c = ml_collections.ConfigDict()
  c.workdir = "runs/judge"

  c.data = ml_collections.ConfigDict(dict(
      format=arg.data,        # "mllm_bench" (questions.json) | "medmat" (release JSON files)
      path="",                # questions.json, or Med-MAT JSON files (comma-separated)
      criteria_path="",       # MLLM-Bench: JSON {id: criteria} / list / JSONL of {id, criteria}
      image_root="",          # relative image paths resolve here (default: inferred from data.path)
      require_criteria=True,  # samples without criteria are skipped (listed in the report)
      limit=0,                # judge only the first N samples (0 = all)
  ))

  c.answers = ml_collections.ConfigDict(dict(
      reference="",           # JSONL (or MLLM-Bench JSON list) of the reference / anchor model: PATH or NAME=PATH
      candidates="",          # comma-separated answer files, one model per file, each PATH or NAME=PATH
  ))

  c.protocol = ml_collections.ConfigDict(dict(
      pairing=arg.pairing,    # "reference": each candidate vs the reference; "all": every pair (Elo)
      elo_rounds=1000,
      elo_seed=42,
      # "last_line": the reply's last label line is its vote (the prompt asks for the vote on the last line);
      # "strict": two different label lines make the reply unparsed.
      label_policy="last_line",
      # Above this fraction of unparsed judge replies the run warns (log and report) and quotes the first
      # replies; a rate equal to it does not warn.
      max_unparsed_rate=0.2,
  ))

  c.judge = ml_collections.ConfigDict(dict(
      kind=arg.judge,         # "http" | "local"
      # http: an OpenAI-compatible chat completions endpoint that accepts image data URLs.
      url="https://api.openai.com/v1/chat/completions",
      model="gpt-4o-2024-08-06",
      api_key_env="OPENAI_API_KEY",  # the variable's NAME; empty for endpoints without auth
      auth_header="Authorization",   # sends "Bearer <key>"; another name sends the bare key (Azure: api-key)
      timeout_s=60.0,
      max_retries=5,
      backoff_initial_s=1.0,
      backoff_max_s=60.0,
      concurrency=8,
      temperature=0.0,
      max_tokens=64,
      seed=0,                 # sent as the request's `seed` (-1: not sent, for endpoints that reject it)
      # local: a LLaVA-format safetensors checkpoint, or a medcg.train workdir (its latest checkpoint), run as a
      # medcg VLM, greedy with a fixed seed.
      checkpoint="",
      tokenizer="",           # tokenizer.json (default: the checkpoint's)
      chat_template="llava_v1",
      dtype="bfloat16",
      batch_size=8,
      max_new_tokens=16,
  ))

  c.cache = ml_collections.ConfigDict(dict(
      path="",                # default: <workdir>/judge_cache.sqlite
      read=True,              # False (or --no_cache): send every call again; replies still refresh it
  ))
  return c
