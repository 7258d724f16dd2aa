"""Multiple-choice answers: parse a generated answer into an option letter, or pick by option likelihood.

Med-MAT publishes no parser (medmat.md §5), so medcg uses one documented, deterministic cascade and
reports how often each stage fires. The output is first normalised: Unicode NFKC (full-width `Ｂ`, `（Ｂ）`,
`：`, `．`, `，` become ASCII), the CJK marks `。` `、` `【】` `「」` become `.` `,` `[]` `""`, curly
apostrophes become `'`, `\\boxed{B}` becomes `B`, and markdown emphasis is dropped.
`parse_answer(output, options)` then tries, in order:

  1. "letter": a standalone letter of an *offered* option (A..D for four options, A..B for two):
     a. the whole answer (or its first line) is the letter: `B`, `b`, `B.`, `B?`, `B。`, `(B)`, `[B]`,
        `B)`, `**B**`, `Option B`, `Ｂ`;
     b. an explicit statement. Answer statements: `Answer: B`, `The answer is (B)`, `答案：B`,
        `答案是 C`, `正确答案为B`, `La respuesta es B`, `Antwort: B`; hedges `I'd say A`, `I think it's B`,
        `it is B`, `我认为是B`, `I would choose B`, `I'll go with C`, `I am going with B`,
        `My best guess is D`, `probably B`, `选B`; verdicts `B is correct`, `B is the answer`,
        `B is the right choice`, `C would be correct`; conclusions `So D.`, `Therefore, C.` (the letter
        ends the sentence). Option statements: `Option B`, `the correct choice is C`, `选项B`. (Answer
        cues: answer, respuesta, antwort, réponse, 答案, guess, say, think, choose, pick, select, go/going
        with, opt for, probably, likely, it's / it is, 认为, 选择, 选; option cues: option, choice, opción,
        选项; verdicts: is / would be / should be / must be / seems to be / appears to be + (the) correct /
        right / best / most likely (answer / choice / option / one), or + the answer.) Answer
        statements outrank option statements, and among equals the last one wins (models conclude at the
        end); "a" before a word is the article, and so is "A" before an option's text. A negated statement
        does not count (`not option A`, `I wouldn't choose A`, `Option A is wrong`, `A is not correct`:
        the negations of 2, within two words before), and `Option A: Normal` lines that label two or more
        options are an echo of the option list, not statements;
     c. the answer starts with an option label: `B. Cyst`, `B: Cyst`, `B) Cyst`, `(B) Cyst`, `B - Cyst`,
        `B, ...`, `B because ...` (or since / as), or `B Cyst` where "Cyst" is option B's text; not when
        the label is negated or rejected (`(B) is wrong`, `A: no`);
     d. exactly one distinct letter appears in a labelled form anywhere: `(B)`, `B:`/`B.`/`B)` before
        that option's text, or `**B**`; a negated label (`not (B)`, `(B) is wrong`) does not count.
     c and d do not fire when several options are labelled (an echo of the option list).
     A capital letter followed by an ordinary word ("A tumor is seen", "I think ...") is an article or a
     pronoun, not an answer, and letters beyond the offered options never count.
     Letters joined by or / and / `/` / `,` / `&` (或 / 和, o / y, oder / und) name no single option:
     when the whole answer is such a run (`B or C`, `B/C`, `either A or B`, `Both B and C`) or the winning
     statement of b is (`Answer: B or C`, `The answer is B/C`, `答案是B或C`, `probably B or C`), the
     answer is "unparsed"; when the first line is one, or capital letters are so joined anywhere
     (unless negated: "A and B are wrong"), c and d do not fire.
  2. "text": option texts, matched case-insensitively as whole words; a mention inside a longer
     mentioned option ("benign tumor" contains "tumor") counts only for the longer option, so "Normal" and
     "Abnormal" and nested labels are told apart. A mention is negated when a negation (not, no, never,
     without, n't, cannot, nor, neither, absence of, absent, negative for, free of, rule(s)/ruled out,
     exclude(s/d), excluding, unlikely, rather than, instead of, 不是, 没有, 并非, 排除, 不选) is among the four
     words before it in its clause (a clause ends at `.,;:!?`, a line break, or but / however / although /
     though / whereas / yet / so / therefore / thus; "not sure", "not certain", "not only" and "no doubt"
     are no negations), or when it is followed by is/are/was/were/seems (to be) + not / unlikely /
     less likely / absent / excluded / ruled out / incorrect / wrong / false, by isn't / aren't, by
     excluded / ruled out, or by not seen / present / visible / identified / detected / correct. A negated
     mention never counts for its option, and neither do the mentions listed after it with `,` / or / nor
     ("no evidence of a stone, cyst or tumor"); when another option is its lexical negation (X and "no X",
     "not X", "non-X", "non X", "nonX", "without X", "abX", "unX", for X of three letters or more:
     Normal/Abnormal, Cyst/No cyst), it counts for that option instead ("Not normal" -> Abnormal,
     "no evidence of tumor" -> "No tumor" even when "tumor" is no option, "not abnormal" -> Normal). No
     other exclusion becomes an answer: "Not benign" with Benign/Malignant, or "no hemorrhage" with
     Normal/Hemorrhage, is unparsed. Then:
     a. an option's text given as the answer (`The answer is a cyst`, `Diagnosis: pneumonia`,
        `the most likely diagnosis is pneumonia`; after answer / diagnosis / impression / respuesta /
        antwort / 答案), not negated and not joined to another mentioned option
        by `,` / `/` / or / and: the last such statement wins;
     b. otherwise, exactly one option is mentioned (counting negated mentions as above), it is not also
        negated, and no other option appears, not negated, in another word form (the option's last word
        cut to its first max(4, length - 3) letters and continued: "malignancy" for Malignant, "tumors"
        for Tumor; negated as above but within six words), which leaves the answer undecided.
  3. "unparsed": (None, "unparsed"). Scored as wrong and reported; never a random pick.

`choose_by_loglik` is the other mode: the option with the highest mean (or summed) token log-prob.
Exact ties return None ("tie", scored wrong), so a degenerate model gets no position bias.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Sequence

import numpy as np

LETTERS = "ABCDEFGH"
STAGES = ("letter", "text", "unparsed")

_MARKUP = re.compile(r"[*_`]+")
_WORD_AFTER = r"(?![A-Za-z0-9])"
# NFKC leaves these CJK marks and curly apostrophes alone; map them to the ASCII the patterns below expect.
_PUNCT = str.maketrans({"。": ". ", "、": ", ", "【": "[", "】": "]", "「": '"', "」": '"', "『": '"', "』": '"',
                        "〔": "(", "〕": ")", "’": "'", "‘": "'"})
_BOXED = re.compile(r"\$*\\boxed\{([^{}]*)\}\$*")


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


def _normalise(text: str) -> str:
  return _BOXED.sub(r"\1", unicodedata.normalize("NFKC", text).translate(_PUNCT))


def _clean(text: str) -> str:
  text = _MARKUP.sub("", text)
  return re.sub(r"[ \t]+", " ", text).strip()


# Negation: the words that cancel what follows in the same clause, the hedges that only look like
# negations, where a clause ends, and the phrases that cancel what precedes them.
_NEG_BEFORE = re.compile(
    r"(?<![a-z])(?:not|no|never|without|nor|neither|cannot|absence\s+of|absent|negative\s+for|free\s+of|"
    r"rules?\s+out|ruled\s+out|exclude[sd]?|excluding|unlikely|rather\s+than|instead\s+of)(?![a-z])"
    r"|n't(?![a-z])|不是|没有|并非|排除|不选", re.IGNORECASE)
_NOT_NEGATION = re.compile(r"(?<![a-z])(?:not\s+(?:\d+\s*%\s+)?(?:sure|certain|only)|no\s+doubt)(?![a-z])",
                           re.IGNORECASE)
_CLAUSE_END = re.compile(r"[.;:!?,\n]|(?<![a-z])(?:but|however|although|though|whereas|yet|so|therefore|thus)"
                         r"(?![a-z])", re.IGNORECASE)
_NEG_AFTER = re.compile(
    r"\s*(?:(?:is|are|was|were|seems|appears)(?:\s+to\s+be)?\s+(?:not(?![a-z])|unlikely|less\s+likely|absent|"
    r"excluded|ruled\s+out|incorrect|wrong|false)|(?:isn't|aren't|wasn't|weren't)(?![a-z])|"
    r"(?:excluded|ruled\s+out)(?![a-z])|not\s+(?:seen|present|visible|identified|detected|correct)(?![a-z]))",
    re.IGNORECASE)


def _negated_before(text: str, start: int, words: int) -> bool:
  head = text[:start]
  cut = max((m.end() for m in _CLAUSE_END.finditer(head)), default=0)
  clause = _NOT_NEGATION.sub(" ", head[cut:])
  return _NEG_BEFORE.search(" ".join(clause.split()[-words:])) is not None


def _negated_after(text: str, end: int) -> bool:
  return _NEG_AFTER.match(text, end) is not None


def _negated(text: str, start: int, end: int, words: int) -> bool:
  return _negated_before(text, start, words) or _negated_after(text, end)


# Letters joined into one answer: "B or C", "B/C", "B, C", "答案是B或C", "B o C", "B oder C".
_CONJ = r"(?:\s*[,/&]\s*|\s+(?:or|and|o|y|oder|und|ou|et)\s+|\s*(?:或者|或|和|还是|及)\s*)"
_ANY_LETTER = r"[(\[]?[A-Ha-h][)\]]?"
_WHOLE_MULTI = re.compile(
    r"(?:(?:answer|option|choice)s?\s*[:\-]?\s*)?(?:either\s+|both\s+)?" + _ANY_LETTER + r"(?:" + _CONJ +
    r"(?:option\s+|choice\s+)?" + _ANY_LETTER + r")+\s*[.:;!?,]?", re.IGNORECASE)
# Capital letters only: "a and b" inside a sentence is prose.
_JOINED_CAPITALS = re.compile(r"(?<![A-Za-z])[(\[]?[A-H][)\]]?(?:" + _CONJ + r"(?:option\s+|choice\s+)?[(\[]?[A-H]"
                              r"[)\]]?" + _WORD_AFTER + r")+")
_TAIL_LETTER = re.compile(r"(?<![A-Za-z])[(\[]?([A-Ha-h])[)\]]?" + _WORD_AFTER)


def _whole_letter(text: str, letters: str) -> str | None:
  m = re.fullmatch(r"(?:option|choice|answer)?\s*[(\[]?\s*([A-Ha-h])\s*[)\]]?\s*[.:;!?,]?", text, re.IGNORECASE)
  if m and m.group(1).upper() in letters:
    return m.group(1).upper()
  return None


_ANSWER_CUES = (r"answer|respuesta|antwort|réponse|答案|guess|say|think|choose|pick|select|go(?:ing)?\s+with|opt\s+for|"
                r"probably|likely|it's|it\s+is|认为|选择|选")
_OPTION_CUES = r"option|choice|opción|选项"
_EXPLICIT = re.compile(
    r"(?<![A-Za-z])(?:(" + _ANSWER_CUES + r")|(?:" + _OPTION_CUES + r"))(?:\s+correcta)?"
    r"(?:\s+(?:is|would\s+be|should\s+be|will\s+be|must\s+be|es|ist|est|lautet)|\s*(?:应该是|应为|应是|是|为))?"
    r"\s*(?:[:=\-]|is)?\s*(?:that\s+)?(?:(?:it|this)(?:'s|\s+is|\s+would\s+be)\s+)?(?:either\s+|both\s+)?"
    r"(?:option\s+|choice\s+|选项\s*)?[(\[\"'“‘]?([A-Ha-h])[)\]\"'”’]?" + _WORD_AFTER +
    # Further letters joined to the first; a lowercase "a" there is the article ("B and a cyst").
    r"((?:" + _CONJ + r"(?:option\s+|choice\s+)?[(\[]?(?-i:[A-H]|[b-h])[)\]]?" + _WORD_AFTER + r")*)",
    re.IGNORECASE)
_VERDICT = re.compile(
    r"(?<![A-Za-z])(?:option\s+|choice\s+)?[(\[]?([A-Ha-h])[)\]]?\s+(?:is|would\s+be|should\s+be|must\s+be|"
    r"seems\s+to\s+be|appears\s+to\s+be)\s+(?:the\s+)?(?:(?:correct|right|best|most\s+likely)"
    r"(?:\s+(?:answer|choice|option|one))?|answer)(?![A-Za-z])", re.IGNORECASE)


# "So D.", "Therefore, C." at the end of a sentence: a conclusion, ranked with answer statements.
_CONCLUSION = re.compile(r"(?<![A-Za-z])(?:so|thus|hence|therefore)\s*,?\s*[(\[]?([A-Ha-h])[)\]]?(?=\s*(?:[.!;]|$))",
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


def _labels_own_text(text: str, end: int, letter: str, options: Sequence[str], letters: str) -> bool:
  """Whether "Option B" at text[:end] is followed by option B's own text (`Option B: Abnormal`)."""
  if letter not in letters or not options[letters.index(letter)].strip():
    return False
  opt = re.escape(options[letters.index(letter)].strip())
  return re.match(rf"\s*[:.)\-]?\s*\(?{opt}", text[end:], re.IGNORECASE) is not None


def _explicit_letters(text: str, options: Sequence[str], letters: str) -> frozenset[str] | None:
  """The letters of the winning explicit statement (several when it joins letters), or None."""
  found, labels = [], []  # (position, rank, letters): rank 2 answers, hedges, verdicts; 1 option cues
  for m in _EXPLICIT.finditer(text):
    letter = m.group(2)
    if _is_article(letter, text[m.end(2):], options) or _negated(text, m.start(), m.end(), 2):
      continue
    group = frozenset({letter.upper()} | {x.upper() for x in _TAIL_LETTER.findall(m.group(3))})
    if m.group(1) is None and len(group) == 1 and _labels_own_text(text, m.end(), letter.upper(), options,
                                                                     letters):
      labels.append((m.start(), 1, group))
    else:
      found.append((m.start(), 2 if m.group(1) else 1, group))
  for m in (*_VERDICT.finditer(text), *_CONCLUSION.finditer(text)):
    if not _negated_before(text, m.start(), 2):
      found.append((m.start(), 2, frozenset({m.group(1).upper()})))
  # "Option A: Normal\nOption B: Abnormal" is the option list, not an answer.
  if len({g for _, _, g in labels}) == 1:
    found += labels
  # A lone letter must be offered; joined letters are an undecided answer whatever they are.
  found = [f for f in found if len(f[2]) > 1 or f[2] <= set(letters)]
  if not found:
    return None
  top = max(rank for _, rank, _ in found)
  return max(f for f in found if f[1] == top)[2]


def _leading_label(text: str, options: Sequence[str], letters: str) -> str | None:
  m = re.match(r"[(\[]?([A-H])(?:\s*[)\].:,]|\s-\s|\s+(?=(?:because|since|as)(?![A-Za-z])))", text)
  if m and m.group(1) in letters:
    # "(B) is wrong", "A: no" reject the option rather than give it.
    rejected = _negated_after(text, m.end()) or re.match(r"\s*(?:no|not|incorrect|wrong|false)\s*(?:[.;,!]|$)",
                                                          text[m.end():], re.IGNORECASE)
    return None if rejected else m.group(1)
  m = re.match(r"([A-H])\s+(.+)", text, re.DOTALL)
  if m and m.group(1) in letters:
    rest = m.group(2).strip().lower()
    if rest.startswith(options[letters.index(m.group(1))].strip().lower()):
      return m.group(1)
  return None


def _labelled_letters(text: str, raw: str, options: Sequence[str], letters: str) -> set[str]:
  """Offered letters written as labels anywhere and not negated: "(B)", "**B**", or "B:"/"B."/"B)" before
  B's text."""
  found = set()
  for where, pattern in ((text, r"\(([A-H])\)"), (raw, r"\*\*\s*([A-H])\s*\*\*")):
    found |= {m.group(1) for m in re.finditer(pattern, where) if not _negated(where, m.start(), m.end(), 2)}
  for i, letter in enumerate(letters):
    if not options[i].strip():
      continue
    opt = re.escape(options[i].strip())
    for m in re.finditer(rf"(?<![A-Za-z]){letter}\s*[.:)]\s*{opt}", text, re.IGNORECASE):
      if not _negated(text, m.start(), m.end(), 2):
        found.add(letter)
  return found & set(letters)


def _joined_letters(text: str) -> bool:
  return any(not _negated(text, m.start(), m.end(), 2) for m in _JOINED_CAPITALS.finditer(text))


# Longest first, so "non-x" is read as non- + x, not non + "-x".
_NEG_PREFIXES = ("without ", "non-", "non ", "not ", "no ", "non", "ab", "un")


def _negates(negation: str, text: str) -> bool:
  """Whether option text `negation` is the lexical negation of `text`: "no cyst" of "cyst", "abnormal" of
  "normal". Three letters at least, so "none" is no negation of "e"."""
  return len(text) >= 3 and any(negation == p + text for p in _NEG_PREFIXES)


_TEXT_ANSWER = re.compile(r"(?:answer|diagnosis|impression|respuesta|antwort|答案)\s*(?:is|would\s+be|es|ist|是|为)?"
                          r"\s*(?:most\s+likely|probably|likely)?\s*[:=\-]?\s*(?:an?\s+|the\s+)?$")
_TEXT_JOINER = re.compile(r"\s*(?:,|/|&|\s(?:or|and))\s*(?:an?\s+|the\s+)?")
_LIST_JOINER = re.compile(r"\s*(?:,|,?\s*(?:or|nor))\s*(?:an?\s+|the\s+)?")


def _option_text(text: str, options: Sequence[str], letters: str) -> str | None:
  lowered = text.lower()
  opts = [o.strip().lower() for o in options]
  # (term, option it names or None, option it names when negated or None)
  terms = []
  for i, o in enumerate(opts):
    if o:
      opposite = [j for j, p in enumerate(opts) if j != i and (_negates(p, o) or _negates(o, p))]
      terms.append((o, i, opposite[0] if len(opposite) == 1 else None))
  for j, o in enumerate(opts):  # "no evidence of tumor" names "No tumor" even when "tumor" is no option
    base = next((o[len(p):] for p in _NEG_PREFIXES if o.startswith(p) and _negates(o, o[len(p):])), None)
    if base is not None and base not in opts:
      terms.append((base, None, j))
  spans = []  # (length, start, end, term index)
  for t, (term, _, _) in enumerate(terms):
    pattern = r"(?<![a-z0-9])" + re.escape(term) + r"(?![a-z0-9])"
    spans += [(m.end() - m.start(), m.start(), m.end(), t) for m in re.finditer(pattern, lowered)]
  kept = []
  for span in sorted(spans, key=lambda s: (-s[0], s[1])):
    if not any(span[1] >= k[1] and span[2] <= k[2] and k[3] != span[3] for k in kept):
      kept.append(span)
  positive, negated, stated = set(), set(), []
  previous_end, previous_negated = -1, False
  for _, start, end, t in sorted(kept, key=lambda k: k[1]):
    _, own, opposite = terms[t]
    # A negation runs on through a list: "no evidence of a stone, cyst or tumor".
    listed = previous_negated and _LIST_JOINER.fullmatch(lowered, previous_end, start) is not None
    previous_end, previous_negated = end, listed or _negated(lowered, start, end, 4)
    if previous_negated:
      if own is not None:
        negated.add(own)
      if opposite is not None:
        positive.add(opposite)  # "not normal" is "Abnormal"
      continue
    if own is None:
      continue
    positive.add(own)
    joiner = _TEXT_JOINER.match(lowered, end)
    joined = joiner is not None and any(k[1] == joiner.end() for k in kept if k[3] != t)
    if _TEXT_ANSWER.search(lowered[:start]) and not joined:
      stated.append((start, own))
  if stated:
    return letters[max(stated)[1]]
  # Another word form of an option ("malignancy", "tumors") is no whole-word mention, but it leaves the
  # answer undecided: "associated with malignancy; benign lesions can look like this" is no "Benign".
  variants = set()
  for i, o in enumerate(opts):
    if not o:
      continue
    head, _, last = o.rpartition(" ")
    stem = (head + " " if head else "") + last[:max(4, len(last) - 3)]
    for m in re.finditer(r"(?<![a-z0-9])" + re.escape(stem) + r"[a-z]*(?![a-z0-9])", lowered):
      inside_mention = any(m.start() < span[2] and span[1] < m.end() for span in spans)
      # A wider window than for mentions: a negated variant only stops blocking ("no fracture or abnormality").
      if not inside_mention and not _negated(lowered, m.start(), m.end(), 6):
        variants.add(i)
  if len(positive) == 1 and not positive & negated and variants <= positive:
    return letters[positive.pop()]
  return None


def parse_answer(output: str, options: Sequence[str]) -> tuple[str | None, str]:
  """The option letter a generated `output` gives for `options` (in letter order), and the stage.

  Returns (letter, "letter" | "text") or (None, "unparsed"); see the module docstring for the cascade.
  """
  if not isinstance(output, str):
    raise TypeError(f"output must be a str, got {type(output).__name__}")
  letters = option_letters(options)
  raw = _normalise(output)
  text = _clean(raw)
  if not text:
    return None, "unparsed"
  first_line = text.splitlines()[0].strip()
  whole = _whole_letter(text, letters)
  if whole is not None:
    return whole, "letter"
  if _WHOLE_MULTI.fullmatch(text):
    return None, "unparsed"
  line = _whole_letter(first_line, letters)
  if line is not None:
    return line, "letter"
  stated = _explicit_letters(text, options, letters)
  if stated is not None:
    return (next(iter(stated)), "letter") if len(stated) == 1 else (None, "unparsed")
  # Joined letters ("B or C. Both fit.") name no single option, so no label may stand for the answer.
  if not (_WHOLE_MULTI.fullmatch(first_line) or _joined_letters(text)):
    # An answer that labels several options (an echo of the option list) names none of them.
    labelled = _labelled_letters(text, raw, options, letters)
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
