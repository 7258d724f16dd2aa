"""The pairwise judge prompt (MLLM-Bench structure, medcg wording) and its version.

Structure follows MLLM-Bench (`scripts/prompts.py`, described in reference/evaluation.md §1.5): a role
block in markdown "###" sections, the two allowed "unable to decide" situations, the rule that the vote
is the last line and is one of four labels, then the item in `~~~` fences and the per-sample criteria.
The wording is medcg's own. `TEMPLATE_VERSION` hashes the template text, so any edit changes every
cache key and old judgements are never replayed for a new prompt.
"""
from __future__ import annotations

import hashlib

ANSWER1 = "Answer1"
ANSWER2 = "Answer2"
UNABLE_ONE = "unable to decide: situation one"
UNABLE_TWO = "unable to decide: situation two"
LABELS = (ANSWER1, ANSWER2, UNABLE_ONE, UNABLE_TWO)

SYSTEM_TEMPLATE = """\
### Role
You are a careful and impartial evaluator of answers to questions about images.
Each item gives you an image, a question about it, the type of the question and two answers written by
different assistants. Decide which answer is better: judge correctness, completeness and helpfulness,
and above all whether the answer agrees with what the image actually shows.

### When you may decline
You may decline to pick a winner in exactly two situations:
- Situation one: the question is close-ended and both answers are correct, or both are wrong.
- Situation two: both answers contain serious factual errors or raise ethical concerns.
In every other case you must choose one answer. The order in which the answers appear says nothing
about their quality.

### Output format
Put your vote alone on the LAST line, written exactly as one of these four strings:
{labels}
"""

ITEM_TEMPLATE = """\
~~~Question
{question}
~~~
~~~Question Type
{question_type}
~~~
~~~Answer1
{answer1}
~~~
~~~Answer2
{answer2}
~~~
"""

CRITERIA_TEMPLATE = """\
### Criteria for this item
Use the following criteria when you make your judgement:
{criteria}
"""

TEMPLATE_VERSION = "medcg-pairwise-v1-" + hashlib.sha256(
    "\x00".join((SYSTEM_TEMPLATE, ITEM_TEMPLATE, CRITERIA_TEMPLATE) + LABELS).encode()).hexdigest()[:12]


def system_prompt() -> str:
  """The judge's role and output rules (identical for every item)."""
  return SYSTEM_TEMPLATE.format(labels="\n".join(LABELS))


def item_prompt(question: str, question_type: str, answer1: str, answer2: str,
                criteria: str | None) -> str:
  """The per-item user text: the fenced question, type, both answers and the criteria block."""
  text = ITEM_TEMPLATE.format(question=question.strip(), question_type=question_type,
                              answer1=answer1.strip(), answer2=answer2.strip())
  if criteria:
    text += "\n" + CRITERIA_TEMPLATE.format(criteria=criteria.strip())
  return text
