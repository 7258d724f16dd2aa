"""Multiple-choice answers: parse a generated answer into an option letter, or pick by option likelihood.

Med-MAT publishes no parser (medmat.md §5), so medcg uses one documented, deterministic cascade and
reports how often each stage fires. `parse_answer(output, options)` tries, in order:

  1. "letter": a standalone letter of an *offered* option (A..D for four options, A..B for two):
     a. the whole answer is the letter: `B`, `b`, `B.`, `(B)`, `[B]`, `B)`, `**B**`, `Option B`;
     b. an explicit statement: `Answer: B`, `The answer is (B)`, `the correct option is B.`,
        `answer: d`, `I'd pick option C`; statements with "answer" outrank "option"/"choice" ones, and
        among equals the last one wins (models conclude at the end); "a" before a word is the article,
        and so is "A" before an option's text;
     c. the answer starts with an option label: `B. Cyst`, `B: Cyst`, `B) Cyst`, `(B) Cyst`, `B - Cyst`,
        or `B Cyst` where "Cyst" is option B's text;
     d. exactly one distinct letter appears in a labelled form anywhere: `(B)`, `B:`/`B.`/`B)` before
        that option's text, or `**B**`.
     c and d do not fire when several options are labelled (an echo of the option list).
     A capital letter followed by an ordinary word ("A tumor is seen", "I think ...") is an article or a
     pronoun, not an answer, and letters beyond the offered options never count.
  2. "text": exactly one option's text is mentioned, matched case-insensitively as whole words; a
     mention inside a longer mentioned option ("benign tumor" contains "tumor") counts only for the
     longer option, so "Normal" and "Abnormal" and nested labels are told apart.
  3. "unparsed": (None, "unparsed"). Scored as wrong and reported; never a random pick.

`choose_by_loglik` is the other mode: the option with the highest mean (or summed) token log-prob.
Exact ties return None ("tie", scored wrong), so a degenerate model gets no position bias.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

LETTERS = "ABCDEFGH"
STAGES = ("letter", "text", "unparsed")

_MARKUP = re.compile(r"[*_`]+")
_WORD_AFTER = r"(?![A-Za-z0-9])"


def option_letters(options: Sequence[str]) -> str:
  """The letters offered for `options` ("ABC" for three options)."""
  if not 1 <= len(options) <= len(LETTERS):
    raise ValueError(f"expected 1..{len(LETTERS)} options, got {len(options)}")
  return LETTERS[:len(options)]


def letter_to_index(letter: str) -> int:
  """"B" -> 1."""
  if len(letter) != 1 or letter.upper() not in LETTERS:
    raise ValueError(f"not an option letter: {letter!r}")
  return LETTERS.index(letter.upper())


def _clean(text: str) -> str:
  text = _MARKUP.sub("", text)
  return re.sub(r"[ \t]+", " ", text).strip()


def _whole_letter(text: str, letters: str) -> str | None:
  m = re.fullmatch(r"(?:option|choice|answer)?\s*[(\[]?\s*([A-Ha-h])\s*[)\]]?\s*[.:;!,]?", text, re.IGNORECASE)
  if m and m.group(1).upper() in letters:
    return m.group(1).upper()
  return None


_EXPLICIT = re.compile(
    r"(?<![A-Za-z])(answer|option|choice)(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?\s*(?:[:=\-]|is)?\s*"
    r"(?:option\s+|choice\s+)?[(\[\"'“‘]?([A-Ha-h])[)\]\"'”’]?" + _WORD_AFTER,
    re.IGNORECASE)


def _is_article(letter: str, following: str, options: Sequence[str]) -> bool:
  """Whether "a"/"A" before a word is the article ("the answer is a cyst"), not option A."""
  m = re.match(r"\s+([A-Za-z].*)", following, re.DOTALL)
  if letter not in "aA" or not m:
    return False
  if letter == "a":
    return True
  rest = m.group(1).lower()
  return any(rest.startswith(o.strip().lower()) for o in options if o.strip())


def _explicit_letter(text: str, options: Sequence[str], letters: str) -> str | None:
  found = [(m.group(1).lower() == "answer", m.group(2).upper()) for m in _EXPLICIT.finditer(text)
           if not _is_article(m.group(2), text[m.end():], options)]
  found = [(is_answer, f) for is_answer, f in found if f in letters]
  # "answer ... B" outranks "option B" ("The answer is B. Option A would be a stone.").
  ranked = [f for is_answer, f in found if is_answer] or [f for _, f in found]
  return ranked[-1] if ranked else None


def _leading_label(text: str, options: Sequence[str], letters: str) -> str | None:
  m = re.match(r"[(\[]?([A-H])\s*(?:[)\].:]|\s-\s)", text)
  if m and m.group(1) in letters:
    return m.group(1)
  m = re.match(r"([A-H])\s+(.+)", text, re.DOTALL)
  if m and m.group(1) in letters:
    rest = m.group(2).strip().lower()
    if rest.startswith(options[letters.index(m.group(1))].strip().lower()):
      return m.group(1)
  return None


def _labelled_letters(text: str, raw: str, options: Sequence[str], letters: str) -> set[str]:
  """Offered letters written as labels anywhere: "(B)", "**B**", or "B:"/"B."/"B)" before B's text."""
  found = set(re.findall(r"\(([A-H])\)", text)) | set(re.findall(r"\*\*\s*([A-H])\s*\*\*", raw))
  for i, letter in enumerate(letters):
    if not options[i].strip():
      continue
    opt = re.escape(options[i].strip())
    if re.search(rf"(?<![A-Za-z]){letter}\s*[.:)]\s*{opt}", text, re.IGNORECASE):
      found.add(letter)
  return found & set(letters)


def _option_text(text: str, options: Sequence[str], letters: str) -> str | None:
  lowered = text.lower()
  spans = []  # (length, start, end, option index)
  for i, opt in enumerate(options):
    opt = opt.strip().lower()
    if not opt:
      continue
    pattern = r"(?<![a-z0-9])" + re.escape(opt) + r"(?![a-z0-9])"
    spans += [(m.end() - m.start(), m.start(), m.end(), i) for m in re.finditer(pattern, lowered)]
  kept = []
  for length, start, end, i in sorted(spans, key=lambda s: (-s[0], s[1])):
    if not any(start >= ks and end <= ke and li != i for _, ks, ke, li in kept):
      kept.append((length, start, end, i))
  chosen = {i for _, _, _, i in kept}
  return letters[chosen.pop()] if len(chosen) == 1 else None


def parse_answer(output: str, options: Sequence[str]) -> tuple[str | None, str]:
  """The option letter a generated `output` gives for `options` (in letter order), and the stage.

  Returns (letter, "letter" | "text") or (None, "unparsed"); see the module docstring for the cascade.
  """
  if not isinstance(output, str):
    raise TypeError(f"output must be a str, got {type(output).__name__}")
  letters = option_letters(options)
  text = _clean(output)
  if not text:
    return None, "unparsed"
  first_line = text.splitlines()[0].strip()
  for candidate in (_whole_letter(text, letters), _whole_letter(first_line, letters),
                    _explicit_letter(text, options, letters)):
    if candidate is not None:
      return candidate, "letter"
  # An answer that labels several options (an echo of the option list) names none of them.
  labelled = _labelled_letters(text, output, options, letters)
  leading = _leading_label(text, options, letters)
  if leading is not None and labelled <= {leading}:
    return leading, "letter"
  if leading is None and len(labelled) == 1:
    return labelled.pop(), "letter"
  letter = _option_text(text, options, letters)
  if letter is not None:
    return letter, "text"
  return None, "unparsed"


def choose_by_loglik(option_logprobs: Sequence[Sequence[float]], reduction: str = "mean"
                     ) -> tuple[int | None, str]:
  """The option whose tokens have the highest mean (or sum) log-probability.

  `option_logprobs[i]` holds the log-probs of option i's answer tokens given the prompt. Returns
  (index, "loglik"), or (None, "tie") when the best score is shared (scored wrong, reported).
  """
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
  if not option_logprobs:
    raise ValueError("no options to choose from")
  scores = []
  for i, lp in enumerate(option_logprobs):
    lp = np.asarray(lp, dtype=np.float64)
    if lp.size == 0:
      raise ValueError(f"option {i} has no tokens")
    scores.append(lp.mean() if reduction == "mean" else lp.sum())
  return _argmax_or_tie(np.asarray(scores))


def _argmax_or_tie(scores: np.ndarray) -> tuple[int | None, str]:
  best = np.max(scores)
  winners = np.flatnonzero(scores == best)
  if len(winners) != 1 or not np.isfinite(best):
    return None, "tie"
  return int(winners[0]), "loglik"


def choose_by_loglik_batch(sum_logprob: np.ndarray, n_tokens: np.ndarray, num_options: np.ndarray,
                           reduction: str = "mean") -> np.ndarray:
  """Vectorised `choose_by_loglik` for a batch: arrays (B, K), (B, K), (B,) -> (B,) indices, -1 on ties.

  Options beyond `num_options[b]` are padding and ignored.
  """
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
  sum_logprob = np.asarray(sum_logprob, np.float64)
  n_tokens = np.asarray(n_tokens)
  k = sum_logprob.shape[1]
  valid = np.arange(k)[None, :] < np.asarray(num_options)[:, None]
  if np.any(valid & (n_tokens <= 0)):
    raise ValueError("a real option has no tokens (n_tokens <= 0)")
  scores = sum_logprob / np.maximum(n_tokens, 1) if reduction == "mean" else sum_logprob
  scores = np.where(valid, scores, -np.inf)
  return np.array([(_argmax_or_tie(row)[0] if _argmax_or_tie(row)[0] is not None else -1) for row in scores],
                  dtype=np.int64)


def accuracy_from_loglik(sum_logprob: np.ndarray, n_tokens: np.ndarray, num_options: np.ndarray,
                         answer_idx: np.ndarray, reduction: str = "mean") -> float:
  """Fraction of rows whose highest-likelihood option is the answer (ties count as wrong)."""
  pred = choose_by_loglik_batch(sum_logprob, n_tokens, num_options, reduction)
  answer_idx = np.asarray(answer_idx)
  if answer_idx.shape != pred.shape:
    raise ValueError(f"answer_idx shape {answer_idx.shape} does not match batch {pred.shape}")
  return float(np.mean(pred == answer_idx)) if len(pred) else 0.0
