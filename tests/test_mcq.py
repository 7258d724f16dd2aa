"""parse_answer on realistic model outputs, and option log-likelihood choice."""
import collections
import json
import pathlib

import numpy as np
import pytest

from medcg.eval import mcq

KIDNEY = ["Stone", "Cyst", "Normal", "Tumor"]                  # Subset 02 record 1, answer B
HEMORRHAGE = ["Normal", "Hemorrhage"]                           # Subset 05, 2 options
QUALITY = ["Outlier", "Good", "Bad"]                            # Subset 17, 3 options
FRACTURE = ["Abnormal", "Normal"]
DR = ["Moderate non-proliferative diabetic retinopathy", "Very severe non-proliferative diabetic retinopathy",
      "Advanced diabetic retinopathy", "No diabetic retinopathy signs"]
NESTED = ["Tumor", "Benign tumor", "Normal", "Cyst"]

CASES = [
    # (output, options, expected letter, expected stage)
    ("B", KIDNEY, "B", "letter"),
    ("B.", KIDNEY, "B", "letter"),
    ("(B)", KIDNEY, "B", "letter"),
    ("b", KIDNEY, "B", "letter"),
    (" **B** ", KIDNEY, "B", "letter"),
    ("[C]", KIDNEY, "C", "letter"),
    ("Answer: B", KIDNEY, "B", "letter"),
    ("answer: d", KIDNEY, "D", "letter"),
    ("The answer is B.", KIDNEY, "B", "letter"),
    ("The answer is (D) Tumor", KIDNEY, "D", "letter"),
    ("The correct answer is **C**.", KIDNEY, "C", "letter"),
    ("The answer is B because the lesion is fluid-filled.", KIDNEY, "B", "letter"),
    ("B: Cyst", KIDNEY, "B", "letter"),
    ("B) Cyst", KIDNEY, "B", "letter"),
    ("B. Cyst", KIDNEY, "B", "letter"),
    ("B - Cyst", KIDNEY, "B", "letter"),
    ("B Cyst", KIDNEY, "B", "letter"),
    ("Option B", KIDNEY, "B", "letter"),
    ('The answer is "B".', KIDNEY, "B", "letter"),
    ("Option A is wrong; the answer is B.", KIDNEY, "B", "letter"),
    ("The answer is B. Option A would mean a stone.", KIDNEY, "B", "letter"),
    ("C. Normal\n\nExplanation: no lesion is visible.", KIDNEY, "C", "letter"),
    ("I would say it is a cyst (B).", KIDNEY, "B", "letter"),
    ("**Answer:** D", KIDNEY, "D", "letter"),
    ("Answer:\nB", KIDNEY, "B", "letter"),
    ("I think the answer is A.", KIDNEY, "A", "letter"),
    ("Looking at the scan, I'd pick option C.", KIDNEY, "C", "letter"),
    ("First I considered A, but the answer is D.", KIDNEY, "D", "letter"),
    ("The image shows (B) Cyst.", KIDNEY, "B", "letter"),
    ("B\nThe kidney contains a round hypodense lesion.", KIDNEY, "B", "letter"),
    # Articles and pronouns are not answers; the option text decides.
    ("A tumor is visible in the left kidney.", KIDNEY, "D", "text"),
    ("The answer is a cyst.", KIDNEY, "B", "text"),
    ("The answer is A tumor.", KIDNEY, "D", "text"),
    ("The answer is A because the calcification casts a shadow.", KIDNEY, "A", "letter"),
    ("I see a stone in the renal pelvis.", KIDNEY, "A", "text"),
    ("There is a hemorrhage in the right parietal lobe.", HEMORRHAGE, "B", "text"),
    ("hemorrhage", HEMORRHAGE, "B", "text"),
    ("Good", QUALITY, "B", "text"),
    ("The image quality is bad.", QUALITY, "C", "text"),
    # Longest match and whole words: Normal vs Abnormal, nested labels.
    ("Abnormal", FRACTURE, "A", "text"),
    ("The radiograph looks normal.", FRACTURE, "B", "text"),
    ("This is a benign tumor.", NESTED, "B", "text"),
    ("This is a tumor.", NESTED, "A", "text"),
    ("No diabetic retinopathy signs are present.", DR, "D", "text"),
    ("very severe non-proliferative diabetic retinopathy", DR, "B", "text"),
    # Letters beyond the offered options never count.
    ("E", KIDNEY, None, "unparsed"),
    ("The answer is D.", HEMORRHAGE, None, "unparsed"),
    ("C", HEMORRHAGE, None, "unparsed"),
    # Ambiguous or empty: unparsed, never a guess.
    ("", KIDNEY, None, "unparsed"),
    ("   ", KIDNEY, None, "unparsed"),
    ("It could be a cyst or a stone.", KIDNEY, None, "unparsed"),
    ("A: Stone\nB: Cyst\nC: Normal\nD: Tumor", KIDNEY, None, "unparsed"),
    ("I cannot determine this from the image.", KIDNEY, None, "unparsed"),
    ("Cystic changes", KIDNEY, None, "unparsed"),
]


@pytest.mark.parametrize("output,options,letter,stage", CASES)
def test_parse_answer_table(output, options, letter, stage):
  assert mcq.parse_answer(output, options) == (letter, stage)


def test_table_is_large_enough():
  assert len(CASES) >= 30


# Hand-graded outputs: grade is the letter a careful grader credits, or null where no single option is given.
GRADED = pathlib.Path(__file__).parent / "data" / "mcq_graded.jsonl"
GRADED_ROWS = [json.loads(line) for line in GRADED.read_text(encoding="utf-8").splitlines() if line.strip()]
KINDS = ("letter_form", "fullwidth", "cjk", "multilingual", "option_text", "nested", "negation", "reasoning",
         "verbose", "echo", "refusal", "article", "pronoun", "two_letters", "hedge", "verdict")


@pytest.mark.parametrize("row", GRADED_ROWS, ids=[r["id"] for r in GRADED_ROWS])
def test_parse_answer_agrees_with_hand_grades(row):
  # Exact agreement: never a wrong letter, and no letter only where the grade is null.
  letter, stage = mcq.parse_answer(row["output"], row["options"])
  assert letter == row["grade"], row["note"]
  assert stage in mcq.STAGES and (letter is None) == (stage == "unparsed")


def test_hand_graded_table_covers_its_kinds():
  assert len(GRADED_ROWS) >= 60
  assert len({r["id"] for r in GRADED_ROWS}) == len(GRADED_ROWS)
  assert {len(r["options"]) for r in GRADED_ROWS} >= {2, 3, 4}
  kinds = collections.Counter(r["kind"] for r in GRADED_ROWS)
  assert set(kinds) == set(KINDS)
  assert all(kinds[k] > 0 for k in KINDS)
  grades = {r["grade"] for r in GRADED_ROWS}
  assert None in grades and {"A", "B", "C", "D"} <= grades


def test_mcq_parsers_script(tmp_path):
  from experiments import mcq_parsers
  out = tmp_path / "mcq_parsers"
  assert mcq_parsers.main(["--table", str(GRADED), "--out", str(out)]) == 0
  result = json.loads((tmp_path / "mcq_parsers.json").read_text(encoding="utf-8"))
  assert len(result["rows"]) == len(GRADED_ROWS)
  for name, counts in result["summary"].items():
    assert sum(counts[o] for o in mcq_parsers.OUTCOMES) == counts["n"] == len(GRADED_ROWS), name
    assert sum(k[name]["n"] for k in result["by_kind"].values()) == len(GRADED_ROWS)
  assert result["summary"]["medcg"]["wrong_letter"] == 0
  assert result["summary"]["medcg"]["random_guess"] == 0
  md = (tmp_path / "mcq_parsers.md").read_text(encoding="utf-8")
  assert "open-compass/VLMEvalKit" in md and "EvolvingLMMs-Lab/lmms-eval" in md


def test_parse_answer_input_errors():
  with pytest.raises(TypeError):
    mcq.parse_answer(None, KIDNEY)
  with pytest.raises(ValueError, match="options"):
    mcq.parse_answer("A", [])


def test_letter_helpers():
  assert mcq.option_letters(QUALITY) == "ABC"
  assert mcq.letter_to_index("c") == 2
  with pytest.raises(ValueError):
    mcq.letter_to_index("Z")


def test_choose_by_loglik_mean_vs_sum():
  # Option 0: one token at -1.0; option 1: three tokens at -0.5 each.
  lps = [[-1.0], [-0.5, -0.5, -0.5]]
  assert mcq.choose_by_loglik(lps, "mean") == (1, "loglik")
  assert mcq.choose_by_loglik(lps, "sum") == (0, "loglik")
  assert mcq.choose_by_loglik([[-1.0], [-0.5, -1.5]], "mean") == (None, "tie")
  with pytest.raises(ValueError, match="no tokens"):
    mcq.choose_by_loglik([[-1.0], []])
  with pytest.raises(ValueError, match="reduction"):
    mcq.choose_by_loglik(lps, "max")


def test_choose_by_loglik_batch_matches_scalar():
  rng = np.random.default_rng()
  seed = int(rng.integers(1 << 30))
  rng = np.random.default_rng(seed)
  b, k = 16, 4
  n_tok = rng.integers(1, 5, size=(b, k))
  num_options = rng.integers(2, k + 1, size=b)
  token_lps = [[rng.normal(size=n_tok[i, j]) - 2.0 for j in range(k)] for i in range(b)]
  sums = np.array([[lp.sum() for lp in row] for row in token_lps])
  for reduction in ("mean", "sum"):
    batch = mcq.choose_by_loglik_batch(sums, n_tok, num_options, reduction)
    for i in range(b):
      idx, _ = mcq.choose_by_loglik(token_lps[i][:num_options[i]], reduction)
      assert batch[i] == (-1 if idx is None else idx), f"seed {seed} row {i}"
  # Padded options never win even with a high score.
  sums[0, 3] = 100.0
  num_options[0] = 2
  assert mcq.choose_by_loglik_batch(sums, n_tok, num_options)[0] in (0, 1)


def test_accuracy_from_loglik_counts_ties_wrong():
  sums = np.array([[-1.0, -2.0], [-3.0, -1.0], [-1.0, -1.0]])
  n_tok = np.ones((3, 2), int)
  acc = mcq.accuracy_from_loglik(sums, n_tok, np.array([2, 2, 2]), np.array([0, 1, 0]))
  assert acc == pytest.approx(2 / 3)
