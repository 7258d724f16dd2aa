"""medcg's MCQ answer parser against VLMEvalKit's and lmms-eval's, on one hand-graded table.

  python -m experiments.mcq_parsers [--table tests/data/mcq_graded.jsonl] [--out experiments/results/mcq_parsers]

Each row of the table is a generated answer, its options and a hand grade: the letter a careful grader credits, or
null when no single option is given. Every parser reads every row, and each result is one of
  agree         the grade's letter, or no letter where the grade is null;
  wrong_letter  a letter other than the grade, or any letter where the grade is null;
  unparsed      no letter where the grade is a letter;
  random_guess  lmms-eval's MMMU parser found nothing and drew a letter at random (seeded; `--seed`); counted
                apart from the other three, whatever the draw.
Prints markdown tables (all rows, and per kind of row) and writes OUT.md and OUT.json (per-row results and the
summary) when `--out` is given.

The peer parsers below are copied from the sources named at each, unchanged but for the calling convention, so that
the comparison needs no install of either toolkit. They stay here, not under medcg/: medcg scores with its own.
"""
from __future__ import annotations

import copy as cp
import datetime
import json
import logging
import os
import pathlib
import platform
import random
import re
import string
import sys
from typing import Any, Callable, Sequence

import numpy as np

from medcg import errors
from medcg.eval import mcq

OUTCOMES = ("agree", "wrong_letter", "unparsed", "random_guess")
TABLE = "tests/data/mcq_graded.jsonl"

SOURCES = {
    "vlmevalkit": {
        "repo": "open-compass/VLMEvalKit", "path": "vlmeval/utils/matching_util.py",
        "commit": "18fc37a5337e31eec9c104887728ad14e82a6a85", "license": "Apache-2.0",
        "functions": "can_infer_option, can_infer_text, can_infer"},
    "lmms-eval": {
        "repo": "EvolvingLMMs-Lab/lmms-eval", "path": "lmms_eval/tasks/mmmu/utils.py",
        "commit": "02bc1c056e173018e36803b70ae900ad69180ac5",
        "license": "Apache-2.0 (lmms_eval/tasks; the rest of lmms-eval is MIT); from the MMMU repo's eval_utils.py",
        "functions": "get_multi_choice_info, parse_multi_choice_response"},
    "lmms-eval@00fa502": {
        "repo": "EvolvingLMMs-Lab/lmms-eval", "path": "lmms_eval/tasks/_task_utils/mmmu_mcq_utils.py",
        "commit": "00fa502c0731f9323ca68364b43588604612f50b", "license": "Apache-2.0 (lmms_eval/tasks)",
        "functions": "parse_mmmu_multi_choice_response (the shared MMMU parser: 'Answer: X' first, no random pick)"},
}


# ---------------------------------------------------------------------------------------------------------------
# VLMEvalKit, vlmeval/utils/matching_util.py at 18fc37a5337e31eec9c104887728ad14e82a6a85.
# Copyright 2023 VLMEvalKit Authors. Licensed under the Apache License, Version 2.0
# (http://www.apache.org/licenses/LICENSE-2.0). Copied verbatim, upstream's 4-space indentation kept so that it
# diffs clean; changes: the names carry a vlmeval_ prefix, and `get_logger` (from vlmeval.smp, reached only when
# the VERBOSE environment variable is set) is the standard library's.
get_logger = logging.getLogger


def vlmeval_can_infer_option(answer, choices):
    verbose = os.environ.get('VERBOSE', 0)
    # Choices is a dictionary
    if 'Failed to obtain answer via API' in answer:
        return False

    reject_to_answer = [
        "Sorry, I can't help with images of people yet.",
        "I can't process this file.",
        "I'm sorry, but without the image provided",
        'Cannot determine the answer'
    ]
    for err in reject_to_answer:
        if err in answer:
            return 'Z'

    def count_choice(splits, choices, prefix='', suffix=''):
        cnt = 0
        for c in choices:
            if prefix + c + suffix in splits:
                cnt += 1
        return cnt

    answer_mod = cp.copy(answer)
    chars = '.()[],:;!*#{}'
    for c in chars:
        answer_mod = answer_mod.replace(c, ' ')

    splits = [x.strip() for x in answer_mod.split()]
    count = count_choice(splits, choices)

    if count == 1:
        for ch in choices:
            if 'A' in splits and len(splits) > 3 and verbose:
                logger = get_logger('Evaluation')
                logger.info(f'A might be a quantifier in the string: {answer}.')
                return False
            if ch in splits:
                return ch
    elif count == 0 and count_choice(splits, {'Z', ''}) == 1:
        return 'Z'
    return False


def vlmeval_can_infer_text(answer, choices):
    answer = answer.lower()
    assert isinstance(choices, dict)
    for k in choices:
        assert k in string.ascii_uppercase
        choices[k] = str(choices[k]).lower()
    cands = []
    for k in choices:
        if choices[k] in answer:
            cands.append(k)
    if len(cands) == 1:
        return cands[0]
    return False


def vlmeval_can_infer(answer, choices):
    answer = str(answer)
    copt = vlmeval_can_infer_option(answer, choices)
    return copt if copt else vlmeval_can_infer_text(answer, choices)


# ---------------------------------------------------------------------------------------------------------------
# lmms-eval, lmms_eval/tasks/mmmu/utils.py at 02bc1c056e173018e36803b70ae900ad69180ac5 ("Helper functions written
# by official MMMU repo", https://github.com/MMMU-Benchmark/MMMU/blob/51ce7f3e829c16bb44bc5445782686b4c3508794/
# eval/eval_utils.py#L10 and data_utils.py#L54).
# Adopted from lmms-eval from https://github.com/EvolvingLMMs-Lab/lmms-eval. Below is the original copyright:
#    Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance
#    with the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#    (lmms-eval's LICENSE: MIT for the pipeline, Apache-2.0 for lmms_eval/tasks and lmms_eval/models.)
# Copied verbatim, 4-space indentation kept; change: the names carry an lmms_ prefix. It draws with the module-level
# `random`, which `compare` seeds.
def lmms_get_multi_choice_info(options):
    """
    Given the list of options for multiple choice question
    Return the index2ans and all_choices
    https://github.com/MMMU-Benchmark/MMMU/blob/51ce7f3e829c16bb44bc5445782686b4c3508794/eval/data_utils.py#L54
    """

    start_chr = "A"
    all_choices = []
    index2ans = {}
    for i, option in enumerate(options):
        index2ans[chr(ord(start_chr) + i)] = option
        all_choices.append(chr(ord(start_chr) + i))

    return index2ans, all_choices


def lmms_parse_multi_choice_response(response, all_choices, index2ans):
    """
    Parse the prediction from the generated response.
    Return the predicted index e.g., A, B, C, D.
    https://github.com/MMMU-Benchmark/MMMU/blob/51ce7f3e829c16bb44bc5445782686b4c3508794/eval/eval_utils.py#L10
    """
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "  # add space to avoid partial match

    index_ans = True
    ans_with_brack = False
    candidates = []
    for choice in all_choices:  # e.g., (A) (B) (C) (D)
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True

    if len(candidates) == 0:
        for choice in all_choices:  # e.g., A B C D
            if f"{choice} " in response:
                candidates.append(choice)

    if len(candidates) == 0:
        for choice in all_choices:  # e.g., A. B. C. D.
            if f"{choice}." in response:
                candidates.append(choice)

    # if all above doesn't get candidates, check if the content is larger than 5 tokens and try to parse the example
    if len(candidates) == 0 and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False  # it's content ans.

    if len(candidates) == 0:  # still not get answer, randomly choose one.
        pred_index = random.choice(all_choices)
    elif len(candidates) > 1:
        start_indexes = []
        if index_ans:
            if ans_with_brack:
                for can in candidates:
                    index = response.rfind(f"({can})")
                    start_indexes.append(index)  # -1 will be ignored anyway
                # start_indexes = [generated_response.index(f'({can})') for can in candidates]
            else:
                for can in candidates:
                    index = response.rfind(f" {can} ")
                    start_indexes.append(index)
        else:
            for can in candidates:
                index = response.lower().rfind(index2ans[can].lower())
                start_indexes.append(index)
        # get the last one
        pred_index = candidates[np.argmax(start_indexes)]
    else:  # if only one candidate, use it.
        pred_index = candidates[0]

    return pred_index


# lmms-eval, lmms_eval/tasks/_task_utils/mmmu_mcq_utils.py at 00fa502c0731f9323ca68364b43588604612f50b (Apache-2.0,
# as above): the shared MMMU parser newer tasks call. Copied verbatim; change: the lmms_ prefix.
LMMS_ANSWER_MARKER_RE = re.compile(r"(?i:answer)\s*[:：]\s*[\*\(\[]*([A-Z])\b")


def lmms_parse_mmmu_multi_choice_response(response, all_choices, index2ans):
    """Prefer the last explicit 'Answer: X'; unparsed responses score 0."""
    markers = [m for m in LMMS_ANSWER_MARKER_RE.findall(response) if m in all_choices]
    if markers:
        return markers[-1]

    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "

    index_ans = True
    ans_with_brack = False
    candidates = []

    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True

    if len(candidates) == 0:
        for choice in all_choices:
            if f"{choice} " in response:
                candidates.append(choice)

    if len(candidates) == 0:
        for choice in all_choices:
            if f"{choice}." in response:
                candidates.append(choice)

    if len(candidates) == 0 and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False

    if len(candidates) == 0:
        pred_index = ""
    elif len(candidates) > 1:
        start_indexes = []
        if index_ans:
            if ans_with_brack:
                for can in candidates:
                    start_indexes.append(response.rfind(f"({can})"))
            else:
                for can in candidates:
                    start_indexes.append(response.rfind(f" {can} "))
        else:
            for can in candidates:
                start_indexes.append(response.lower().rfind(index2ans[can].lower()))
        pred_index = candidates[np.argmax(start_indexes)]
    else:
        pred_index = candidates[0]

    return pred_index
# ---------------------------------------------------------------------------------------------------------------


def _medcg(output: str, options: Sequence[str]) -> tuple[str | None, Any, bool]:
  letter, stage = mcq.parse_answer(output, options)
  return letter, stage, False


def _vlmeval(infer: Callable[[str, dict], Any]) -> Callable[[str, Sequence[str]], tuple[str | None, Any, bool]]:
  def parse(output, options):
    # A fresh dict each call: can_infer_text lowercases the choices in place.
    raw = infer(output, {letter: text for letter, text in zip(string.ascii_uppercase, options)})
    # "Z" is VLMEvalKit's refusal, False its "cannot infer": neither names an option.
    return (raw if raw and raw != "Z" else None), raw, False
  return parse


def _lmms(parse_fn: Callable[[str, list, dict], str]) -> Callable[[str, Sequence[str]], tuple[str | None, Any, bool]]:
  def parse(output, options):
    index2ans, all_choices = lmms_get_multi_choice_info(list(options))
    state = random.getstate()
    raw = parse_fn(output, all_choices, index2ans)
    # The MMMU parser draws only when it found nothing; a draw is seen as a change of the random state.
    guessed = random.getstate() != state
    return (raw if raw in all_choices else None), raw, guessed
  return parse


PARSERS: dict[str, Callable[[str, Sequence[str]], tuple[str | None, Any, bool]]] = {
    "medcg": _medcg,
    "vlmevalkit": _vlmeval(vlmeval_can_infer),
    "lmms-eval": _lmms(lmms_parse_multi_choice_response),
    "lmms-eval@00fa502": _lmms(lmms_parse_mmmu_multi_choice_response),
}
MAIN_PARSERS = ("medcg", "vlmevalkit", "lmms-eval")


def load_table(path: str) -> list[dict[str, Any]]:
  """The hand-graded rows of a JSONL table, checked: options 1..8, grade an offered letter or null."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      row = json.loads(line)
      missing = {"id", "options", "output", "grade", "kind"} - set(row)
      if missing:
        raise ValueError(f"{path}:{n}: missing {sorted(missing)}")
      letters = mcq.option_letters(row["options"])
      if row["grade"] is not None and row["grade"] not in letters:
        raise ValueError(f"{path}:{n}: grade {row['grade']!r} is not one of {letters}")
      rows.append(row)
  ids = [r["id"] for r in rows]
  if len(set(ids)) != len(ids):
    raise ValueError(f"{path}: duplicate ids")
  return rows


def outcome(pred: str | None, grade: str | None, guessed: bool) -> str:
  if guessed:
    return "random_guess"
  if pred == grade:
    return "agree"
  return "wrong_letter" if pred is not None else "unparsed"


def _counts(outcomes: Sequence[str]) -> dict[str, int]:
  return {o: sum(x == o for x in outcomes) for o in OUTCOMES} | {"n": len(outcomes)}


def compare(rows: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
  """Every parser on every row: per-row results, and counts overall and per kind."""
  random.seed(seed)
  per_row = []
  for row in rows:
    entry = {k: row[k] for k in ("id", "kind", "options", "output", "grade")}
    for name, parse in PARSERS.items():
      pred, raw, guessed = parse(row["output"], row["options"])
      entry[name] = {"pred": pred, "raw": raw, "outcome": outcome(pred, row["grade"], guessed)}
    per_row.append(entry)
  kinds = list(dict.fromkeys(r["kind"] for r in rows))
  summary = {name: _counts([e[name]["outcome"] for e in per_row]) for name in PARSERS}
  for name in PARSERS:  # a lucky draw is still a draw; how many landed on the grade is worth knowing
    summary[name]["random_guess_on_grade"] = sum(e[name]["outcome"] == "random_guess" and e[name]["pred"] == e["grade"]
                                                 for e in per_row)
  by_kind = {kind: {name: _counts([e[name]["outcome"] for e in per_row if e["kind"] == kind]) for name in PARSERS}
             for kind in kinds}
  return {"rows": per_row, "summary": summary, "by_kind": by_kind}


def _pct(k: int, n: int) -> str:
  return f"{k} ({100 * k / n:.1f} %)" if n else "0"


def markdown(result: dict[str, Any], names: Sequence[str]) -> str:
  s = result["summary"]
  lines = ["| parser | rows | agree | wrong letter | unparsed (grade is a letter) | random guess (on the grade) |",
           "|---|---|---|---|---|---|"]
  for name in names:
    c = s[name]
    guess = f"{_pct(c['random_guess'], c['n'])} ({c['random_guess_on_grade']})" if c["random_guess"] else "0"
    lines.append(f"| {name} | {c['n']} | {_pct(c['agree'], c['n'])} | {_pct(c['wrong_letter'], c['n'])} | "
                 f"{_pct(c['unparsed'], c['n'])} | {guess} |")
  lines += ["", "Per kind of row: agree / wrong letter / unparsed (/ random guess), of n.", "",
            "| kind | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
  for kind, by_parser in result["by_kind"].items():
    cells = []
    for name in names:
      c = by_parser[name]
      cells.append(f"{c['agree']} / {c['wrong_letter']} / {c['unparsed']}" +
                   (f" / {c['random_guess']}" if c["random_guess"] else ""))
    lines.append(f"| {kind} | {by_parser[names[0]]['n']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _wrong_rows(result: dict[str, Any], name: str) -> list[str]:
  out = []
  for e in result["rows"]:
    if e[name]["outcome"] == "wrong_letter":
      text = e["output"].replace("\n", " ").replace("|", "/")
      text = text if len(text) <= 70 else text[:67] + "..."
      out.append(f"| {e['id']} | {text} | {e['grade'] or 'null'} | {e[name]['pred']} |")
  return out


def report(result: dict[str, Any], meta: dict[str, Any]) -> str:
  lines = ["# MCQ answer parsers on one hand-graded table", "",
           f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ", f"Machine: {meta['machine']}  ",
           f"Table: `{meta['table']}`, {meta['rows']} rows, graded by hand (a letter, or null: no single answer); "
           f"lmms-eval's random draws seeded with {meta['seed']}.", "",
           "Outcomes: *agree* = the grade's letter, or no letter where the grade is null; *wrong letter* = a letter "
           "other than the grade, or any letter where the grade is null; *unparsed* = no letter where the grade is "
           "a letter; *random guess* = lmms-eval's MMMU parser found nothing and drew a letter (counted apart, "
           "whatever the draw). VLMEvalKit's `Z` (refusal) and `False` (cannot infer) both count as no letter.", "",
           "## medcg and the two peers", "", markdown(result, MAIN_PARSERS), "",
           ("Reading: the table is medcg's acceptance test (tests/test_mcq.py asserts exact agreement on every row), "
           "written together with the parser's negation, two-letter, CJK, hedge and verdict rules, so medcg's "
           "agreement here is by construction; it measures the peers on the same outputs, not medcg on unseen "
           "ones. Neither peer is used alone upstream: VLMEvalKit sends what `can_infer` cannot read to an LLM "
           "judge (its *unparsed* rows are not final scores there), and lmms-eval's MMMU parser is meant for "
           "prompts that ask for the letter only; its random draw is MMMU's official behaviour. Outputs medcg "
           "is known to leave unparsed where a grader would credit a letter, and so kept out of the table: other "
           "word forms of an option (\"multiple stones\", \"No abnormalities.\"), option text in another "
           "language (\"答案是肺炎\"), per-option yes/no lists, \"答案不是A，是B\"; and to misread: a "
           "self-corrected option cue (\"I select option A? No, B.\" gives A) and an option cue negated after "
           "a colon (\"Option B: not a cyst\" gives B). For medcg the JSON's `raw` is the cascade stage."
            if os.path.samefile(meta["table"], TABLE) else
            "Reading: this table is not medcg's acceptance test; it was run on the parsers as they are. For medcg "
            "the JSON's `raw` is the cascade stage."), "",
           "## Other stored versions of the peers", "",
           "The index of public code holds more than one version of each peer file (which is newer is not recorded "
           "there). lmms-eval's shared MMMU parser is a different function and runs here. VLMEvalKit's other "
           "stored version (134b4ea61d26cb15b6fac405dec3ff6a88e2bc31) differs from 18fc37a in two lines "
           "(`can_infer_option` also needs the letter before the last five tokens, `can_infer_text` gives up on "
           "answers longer than twice the options' text); it is not copied a second time.", "",
           markdown(result, ["medcg"] + [n for n in PARSERS if n not in MAIN_PARSERS]), "",
           "## Sources of the peer code", "", "| parser | repo | path | commit | license | functions |",
           "|---|---|---|---|---|---|"]
  for name, src in SOURCES.items():
    lines.append(f"| {name} | {src['repo']} | `{src['path']}` | `{src['commit']}` | {src['license']} | "
                 f"{src['functions']} |")
  lines += ["", "Copied into `experiments/mcq_parsers.py` unchanged but for the calling convention (options as "
            "VLMEvalKit's letter -> text dict, or lmms-eval's `get_multi_choice_info`).", ""]
  for name in MAIN_PARSERS[1:]:
    wrong = _wrong_rows(result, name)
    lines += [f"## Rows where {name} gives a wrong letter ({len(wrong)})", "", "| id | output | grade | parsed |",
              "|---|---|---|---|"] + wrong + [""]
  return "\n".join(lines)


def _machine() -> str:
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"{cores}-core dev machine, Python {platform.python_version()}"


def main(argv: Sequence[str] | None = None) -> int:
  p = errors.ArgumentParser(description=__doc__)
  p.add_argument("--table", default=TABLE, help="hand-graded JSONL table")
  p.add_argument("--out", default="", help="write OUT.md and OUT.json")
  p.add_argument("--seed", type=int, default=0, help="seed of lmms-eval's random pick")
  a = p.parse_args(argv)
  rows = load_table(a.table)
  result = compare(rows, a.seed)
  meta = {"command": "python -m experiments.mcq_parsers " + " ".join(sys.argv[1:] if argv is None else argv),
          "date": datetime.date.today().isoformat(), "machine": _machine(), "table": a.table, "rows": len(rows),
          "seed": a.seed, "VERBOSE": os.environ.get("VERBOSE", 0), "sources": SOURCES}
  print(markdown(result, MAIN_PARSERS))
  if a.out:
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out + ".md").write_text(report(result, meta) + "\n", encoding="utf-8")
    pathlib.Path(a.out + ".json").write_text(json.dumps({"meta": meta, **result}, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
  return 0


if __name__ == "__main__":
  sys.exit(main())
