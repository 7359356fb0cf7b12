r"""Answer extraction and grading: a table of hard cases with expected verdicts; time bounds."""

import concurrent.futures
import re
import time

import pytest

from jaxdistill.eval import extract, grade, metrics, tasks

B = "\\boxed"
LONG_COT = "Let me think. " * 200 + "Maybe 999 or 7. "

# (id, response, gold, kind, finish_reason, expected reason). Each row is a case a grader in
# the field got wrong, or a look-alike of one that must go the other way.
CASES = [
    # --- extraction: boxes -------------------------------------------------------------------
    ("nested-braces", f"so {B}{{\\frac{{\\sqrt{{3}}}}{{2}}}}.", "\\frac{\\sqrt3}{2}", "math", None,
     "correct"),
    ("nested-left-right", f"{B}{{\\left( 3, \\frac{{\\pi}}{{2}} \\right)}}",
     "\\left( 3, \\frac{\\pi}{2} \\right)", "math", None, "correct"),
    ("escaped-set-braces", f"{B}{{\\{{1, 2\\}}}}", "\\{2,1\\}", "math", None, "correct"),
    ("repeated-box-agrees", f"{B}{{004}}\n**Final Answer**\n{B}{{004}}\n{B}{{004}}", "4", "aime",
     None, "correct"),
    ("final-answer-box-twice", f"**Final Answer**\n{B}{{699}}\n\n**Final Answer**\n{B}{{699}}",
     "699", "aime", None, "correct"),
    ("last-box-wins-wrong", f"{B}{{113}}. Wait, recheck: ... {B}{{112}}", "113", "aime", None,
     "wrong"),
    ("last-box-wins-right", f"{B}{{112}}. Wait, recheck: ... {B}{{113}}", "113", "aime", None,
     "correct"),
    ("prose-word-boxed-after", f"{B}{{33}}. The boxed value above is final.", "33", "aime", None,
     "correct"),
    ("prose-boxed-number-after", f"{B}{{33}}. Earlier I boxed 34 by mistake.", "33", "aime", None,
     "correct"),
    ("unbraced-box-dollar", "So $\\boxed 5$.", "5", "aime", None, "correct"),
    ("unbraced-box-space", "The result is \\boxed 12 as required.", "12", "aime", None,
     "correct"),
    ("fbox", "Hence \\fbox{204}.", "204", "aime", None, "correct"),
    ("framebox", "Therefore the walk takes \\framebox{204} minutes.", "204", "aime", None,
     "correct"),
    ("framebox-optional-args", "\\framebox[2cm][c]{204}", "204", "aime", None, "correct"),
    ("macro-lookalike-not-box", "\\boxedanswer{12}", "12", "aime", None, "no_answer"),
    ("nested-box", f"{B}{{{B}{{7}}}}", "7", "aime", None, "correct"),
    ("unclosed-box-only", f"so the answer is {B}{{12", "12", "aime", None, "no_answer"),
    ("empty-box", f"{B}{{}}", "12", "aime", None, "no_answer"),
    ("multi-box-set-math", "The roots are $\\boxed{1}$ and $\\boxed{2}$.", "\\{1,2\\}", "math",
     None, "correct"),
    ("multi-box-lines-are-revisions", "$\\boxed{1}$\n$\\boxed{2}$", "2", "math", None,
     "correct"),
    ("multi-box-aime-last", "$\\boxed{3}$ and $\\boxed{4}$", "4", "aime", None, "correct"),
    # --- thinking sections and truncation ----------------------------------------------------
    ("think-closed-answer-after", f"<think>try {B}{{1}}</think>The answer is {B}{{2}}.", "2",
     "aime", None, "correct"),
    ("think-closed-draft-not-read", f"<think>try {B}{{1}}</think>The answer is {B}{{2}}.", "1",
     "aime", None, "wrong"),
    ("think-only-close-tag", f"{LONG_COT}{B}{{5}}</think>\nFinal: {B}{{6}}", "6", "aime", None,
     "correct"),
    ("think-unclosed", f"<think>{LONG_COT}so {B}{{902}}", "902", "aime", None, "no_answer"),
    ("think-unclosed-length", f"<think>{LONG_COT}so {B}{{902}}", "902", "aime", "length",
     "truncated"),
    ("truncated-even-if-right", f"<think>x</think>{B}{{902}} and more", "902", "aime", "length",
     "truncated"),
    ("think-reopened", f"<think>a</think>{B}{{3}} <think> wait {B}{{4}}", "4", "aime", None,
     "no_answer"),
    ("box-only-in-thinking", f"<think>{B}{{17}}</think>I am done.", "17", "aime", None,
     "no_answer"),
    ("sharegpt-thought", f"<|begin_of_thought|>{B}{{7}}<|end_of_thought|><|begin_of_solution|>"
     f"Thus {B}{{8}}<|end_of_solution|>", "8", "aime", None, "correct"),
    ("sharegpt-unclosed", f"<|begin_of_thought|>so {B}{{7}}", "7", "aime", None, "no_answer"),
    ("finish-stop-normal", f"{B}{{7}}", "7", "aime", "stop", "correct"),
    # --- no last-number fallback; natural-language cues -------------------------------------
    ("no-fallback-last-number", f"{LONG_COT} so it is 42", "42", "aime", None, "no_answer"),
    ("cue-answer-is", "Adding up, the answer is 42.", "42", "aime", None, "correct"),
    ("cue-final-answer-dollar", "Final Answer: $\\frac{1}{2}$", "0.5", "math", None, "correct"),
    ("cue-minerva", "Final Answer: The final answer is $5$. I hope it is correct.", "5", "aime",
     None, "correct"),
    ("cue-answer-line", "Work...\nAnswer: 204 minutes\n", "204", "aime", None, "correct"),
    ("cue-clause", "So the answer is 12, which is even.", "12", "aime", None, "correct"),
    ("cue-final-answer-heading", "**Final Answer**\n\n$$ 42 $$", "42", "aime", None, "correct"),
    ("cue-unclosed-box-not-read", "The answer is \\boxed{42", "42", "aime", None, "no_answer"),
    ("cue-inside-thinking-only", "<think>the answer is 5</think>Not sure.", "5", "aime", None,
     "no_answer"),
    # --- integers: leading zeros, signs, separators, leniency --------------------------------
    ("leading-zeros-pred", f"{B}{{033}}", "33", "aime", None, "correct"),
    ("leading-zeros-gold", f"{B}{{33}}", "033", "aime", None, "correct"),
    ("no-x100-leniency-down", f"{B}{{0.33}}", "33", "aime", None, "wrong"),
    ("no-x100-leniency-up", f"{B}{{3300}}", "33", "aime", None, "wrong"),
    ("percent-sign-only", f"{B}{{33\\%}}", "33", "aime", None, "correct"),
    ("non-integer-aime", f"{B}{{33.5}}", "33", "aime", None, "wrong"),
    ("integral-decimal-aime", f"{B}{{33.0}}", "33", "aime", None, "correct"),
    ("dfrac-integer-aime", f"{B}{{\\dfrac{{50}}{{2}}}}", "25", "aime", None, "correct"),
    ("frac-non-integer-aime", f"{B}{{\\frac{{100}}{{3}}}}", "33", "aime", None, "wrong"),
    ("assignment-rhs-aime", f"{B}{{m+n=33}}", "33", "aime", None, "correct"),
    ("arithmetic-aime", f"{B}{{2^{{10}}-1000}}", "24", "aime", None, "correct"),
    ("text-wrapped-aime", f"{B}{{\\text{{33}}}}", "33", "aime", None, "correct"),
    ("unit-word-aime", f"{B}{{33 \\text{{ minutes}}}}", "33", "aime", None, "correct"),
    ("degrees-aime", f"{B}{{33^\\circ}}", "33", "aime", None, "correct"),
    ("list-not-first-aime", f"{B}{{3 \\text{{ and }} 4}}", "3", "aime", None, "wrong"),
    ("variable-aime", f"{B}{{x}}", "3", "aime", None, "wrong"),
    ("negative-amc", f"{B}{{-1}}", "-1", "amc", None, "correct"),
    ("unicode-minus-amc", f"{B}{{\u22121}}", "-1", "amc", None, "correct"),
    ("sign-matters-amc", f"{B}{{1}}", "-1", "amc", None, "wrong"),
    ("float-gold-amc", f"{B}{{27}}", "27.0", "amc", None, "correct"),
    ("thousands-commas", f"{B}{{7,425,000}}", "7425000", "amc", None, "correct"),
    ("thousands-space", f"{B}{{1 000}}", "1000", "amc", None, "correct"),
    ("thousands-thin-space", f"{B}{{1\\,000}}", "1000", "amc", None, "correct"),
    ("thousands-negspace", f"{B}{{11,\\!111,\\!111,\\!100}}", "11111111100", "amc", None,
     "correct"),
    ("thousands-braced-comma", f"{B}{{10{{,}}000}}", "10000", "amc", None, "correct"),
    ("comma-space-is-tuple", f"{B}{{32, 349}}", "32349", "amc", None, "wrong"),
    ("short-comma-is-tuple", f"{B}{{3,4}}", "34", "aime", None, "wrong"),
    ("decimal-comma-not-int", f"{B}{{1,22}}", "122", "aime", None, "wrong"),
    # --- MATH: numbers, radicals, forms ------------------------------------------------------
    ("frac-vs-decimal", f"{B}{{0.5}}", "\\frac{1}{2}", "math", None, "correct"),
    ("frac-vs-long-decimal", f"{B}{{0.0833333333333333}}", "\\frac{1}{12}", "math", None,
     "correct"),
    ("third-vs-rounded", f"{B}{{0.333}}", "\\frac13", "math", None, "wrong"),
    ("dfrac-tfrac", f"{B}{{\\tfrac34}}", "\\dfrac{3}{4}", "math", None, "correct"),
    ("malformed-frac", f"{B}{{\\frac3{{3}}}}", "1", "math", None, "correct"),
    ("radical-forms", f"{B}{{\\sqrt{{8}}}}", "2\\sqrt{2}", "math", None, "correct"),
    ("rationalised", f"{B}{{\\frac{{1}}{{\\sqrt3}}}}", "\\frac{\\sqrt{3}}{3}", "math", None,
     "correct"),
    ("radical-near-miss", f"{B}{{4\\sqrt2}}", "4", "math", None, "wrong"),
    ("golden-near-miss", f"{B}{{\\frac{{1+\\sqrt5}}{{2}}}}", "2", "math", None, "wrong"),
    ("big-int-exact", f"{B}{{12000023}}", "12000000", "math", None, "wrong"),
    ("trig-identity", f"{B}{{\\tan^2 y+1}}", "\\sec^2 y", "math", None, "correct"),
    ("split-fraction", f"{B}{{\\frac{{x}}{{7}}+\\frac{{2}}{{7}}}}", "\\frac{x+2}{7}", "math", None,
     "correct"),
    ("expanded-square", f"{B}{{(x+1)^2}}", "x^2+2x+1", "math", None, "correct"),
    ("dropped-variable", f"{B}{{(+5)(b+2)}}", "(a+5)(b+2)", "math", None, "wrong"),
    ("extra-term", f"{B}{{x+2n+1}}", "x+1", "math", None, "wrong"),
    ("mathrm-e-sign", f"{B}{{1 + \\frac{{1}}{{\\mathrm{{e}}}}}}", "1 - \\frac{1}{\\mathrm{e}}",
     "math", None, "wrong"),
    ("complex-conjugate", f"{B}{{6-9i}}", "6+9i", "math", None, "wrong"),
    ("complex-reordered", f"{B}{{9i+6}}", "6+9i", "math", None, "correct"),
    ("assignment-math", f"{B}{{k = \\frac13}}", "\\frac{1}{3}", "math", None, "correct"),
    ("cfrac", f"{B}{{\\cfrac{{1}}{{2}}}}", "0.5", "math", None, "correct"),
    ("strict-variables", f"{B}{{f(y)}}", "f(x)", "math", None, "wrong"),
    ("negated-plane", f"{B}{{-34x-45y+20z-100=0}}", "34x+45y-20z+100=0", "math", None, "correct"),
    ("choice-bare-letter", f"{B}{{E}}", "\\text{E}", "math", None, "correct"),
    ("matrix-brackets", f"{B}{{\\begin{{bmatrix}} -2 \\\\ -14 \\end{{bmatrix}}}}",
     "\\begin{pmatrix} -2 \\\\ -14 \\end{pmatrix}", "math", None, "correct"),
    # --- MATH: intervals, tuples, sets, relations --------------------------------------------
    ("open-vs-half-open", f"{B}{{[0,9)}}", "(0,9)", "math", None, "wrong"),
    ("infinite-interval", f"{B}{{(-\\infty,3]}}", "(-\\infty, 3]", "math", None, "correct"),
    ("membership-vs-interval", f"{B}{{[-2,7]}}", "x \\in [-2,7]", "math", None, "correct"),
    ("membership-vs-relation", f"{B}{{-2 \\le x \\le 7}}", "x \\in [-2,7]", "math", None,
     "correct"),
    ("tuple-frac-decimal", f"{B}{{(1,4.5)}}", "(1,\\frac92)", "math", None, "correct"),
    ("tuple-order", f"{B}{{(2,1)}}", "(1,2)", "math", None, "wrong"),
    ("tuple-vs-set", f"{B}{{\\{{1,2\\}}}}", "(1,2)", "math", None, "wrong"),
    ("set-order", f"{B}{{\\{{3,1,2\\}}}}", "\\{1,2,3\\}", "math", None, "correct"),
    ("pm-vs-one", f"{B}{{2021}}", "\\pm 2021", "math", None, "wrong"),
    ("pm-vs-set", f"{B}{{\\pm 2021}}", "\\{-2021,2021\\}", "math", None, "correct"),
    ("flipped-relation", f"{B}{{5 \\le x}}", "x \\ge 5", "math", None, "correct"),
    ("opposite-relation", f"{B}{{x<5}}", "x>5", "math", None, "wrong"),
    # --- MATH: text, units, degrees, percent -------------------------------------------------
    ("unit-mbox-squared", f"{B}{{15}}", "15\\mbox{ cm}^2", "math", None, "correct"),
    ("unit-textnormal", f"{B}{{125\\textnormal{{ miles}}}}", "125", "math", None, "correct"),
    ("unit-after-frac", f"{B}{{\\frac{{1}}{{3}}\\text{{meters}}}}", "1/3", "math", None, "correct"),
    ("unit-yuan", f"{B}{{0.06 \\text{{ yuan}}}}", "0.06", "math", None, "correct"),
    ("text-number-pred", f"{B}{{\\text{{13}}}}", "13", "math", None, "correct"),
    ("text-number-gold", f"{B}{{13}}", "\\text{13}", "math", None, "correct"),
    ("degrees-pred", f"{B}{{90^\\circ}}", "90", "math", None, "correct"),
    ("degrees-word-gold", f"{B}{{\\frac{{270}}{{7}}^{{\\circ}}}}", "\\frac{270}7\\text{ degrees}",
     "math", None, "correct"),
    ("radians-not-degrees", f"{B}{{90^\\circ}}", "\\frac{\\pi}{2}", "math", None, "wrong"),
    ("percent-word", f"{B}{{28 \\text{{ percent}}}}", "28\\%", "math", None, "correct"),
    ("percent-dropped", f"{B}{{28}}", "28\\%", "math", None, "correct"),
    ("percent-not-rescaled", f"{B}{{0.28}}", "28\\%", "math", None, "wrong"),
    ("dollars", f"{B}{{\\$5.40}}", "5.4", "math", None, "correct"),
    ("text-name", f"{B}{{Evelyn}}", "\\text{Evelyn}", "math", None, "correct"),
    ("text-name-anagram", f"{B}{{Evylen}}", "\\text{Evelyn}", "math", None, "wrong"),
    ("choice-with-value", f"{B}{{\\textbf{{(C)}}\\ 12}}", "\\text{(C)}", "math", None, "correct"),
    ("choice-other", f"{B}{{(B)}}", "\\text{(C)}", "math", None, "wrong"),
    # --- MATH: answers that are not mathematics (`normalize_text`) ----------
    ("clock-split-text", f"{B}{{9:00 \\text{{ a.m.}}}}", "\\text{9:00 a.m.}", "math", None,
     "correct"),
    ("clock-whole-text", f"{B}{{\\text{{9:00 a.m.}}}}", "9:00 \\text{ a.m.}", "math", None,
     "correct"),
    ("clock-case-and-dots", f"{B}{{\\text{{9:00 AM}}}}", "\\text{9:00 a.m.}", "math", None,
     "correct"),
    ("clock-hour-zero", "The answer is 09:00 a.m.", "\\text{9:00 a.m.}", "math", None, "correct"),
    ("clock-am-not-pm", f"{B}{{9:00 \\text{{ p.m.}}}}", "9:00 \\text{ a.m.}", "math", None,
     "wrong"),
    ("clock-meridiem-not-a-unit", f"{B}{{9:00}}", "9:00 \\text{ a.m.}", "math", None, "wrong"),
    ("clock-other-hour", f"{B}{{\\text{{10:00 a.m.}}}}", "\\text{9:00 a.m.}", "math", None,
     "wrong"),
    ("choice-text-vs-bare-gold", f"{B}{{\\text{{(C)}}}}", "C", "math", None, "correct"),
    ("choice-bare-vs-text-gold", f"{B}{{C}}", "\\text{(C)}", "math", None, "correct"),
    ("choice-textbf", f"{B}{{\\textbf{{(C)}}}}", "\\text{(C)}", "math", None, "correct"),
    ("choice-lowercase", f"{B}{{(c)}}", "\\text{(C)}", "math", None, "correct"),
    ("choice-with-option-text", f"{B}{{\\text{{(C) Plane}}}}", "\\text{(C)}", "math", None,
     "correct"),
    ("choice-closing-paren-only", f"{B}{{\\text{{C) Plane}}}}", "\\text{(C)}", "math", None,
     "correct"),
    ("choice-hedged", f"{B}{{\\text{{(C) or (D)}}}}", "\\text{(C)}", "math", None, "wrong"),
    ("choice-hedged-bare", f"{B}{{\\text{{C or D}}}}", "\\text{(C)}", "math", None, "wrong"),
    ("choice-two-listed", f"{B}{{(C), (D)}}", "\\text{(C)}", "math", None, "wrong"),
    ("choice-expression", f"{B}{{c + 1}}", "\\text{(C)}", "math", None, "wrong"),
    ("choice-number", f"{B}{{3}}", "\\text{(C)}", "math", None, "wrong"),
    ("choice-list-order", f"{B}{{\\text{{C, A}}}}", "\\text{A, C}", "math", None, "correct"),
    ("choice-list-subset", f"{B}{{\\text{{A}}}}", "\\text{A, C}", "math", None, "wrong"),
    ("day-bare-vs-text-gold", f"{B}{{Tuesday}}", "\\text{Tuesday}", "math", None, "correct"),
    ("day-text-vs-bare-gold", f"{B}{{\\text{{Tuesday}}}}", "Tuesday", "math", None, "correct"),
    ("day-case-and-stop", f"{B}{{\\text{{tuesday.}}}}", "Tuesday", "math", None, "correct"),
    ("day-mathrm", f"{B}{{\\mathrm{{Tuesday}}}}", "\\text{Tuesday}", "math", None, "correct"),
    ("day-textit-gold", f"{B}{{Tuesday}}", "\\textit{Tuesday}", "math", None, "correct"),
    ("day-other", f"{B}{{\\text{{Thursday}}}}", "\\text{Tuesday}", "math", None, "wrong"),
    ("day-trailing-word", f"{B}{{\\text{{Tuesday morning}}}}", "\\text{Tuesday}", "math", None,
     "wrong"),
    ("name-anagram-bare-gold", f"{B}{{Evylen}}", "Evelyn", "math", None, "wrong"),
    ("word-quoted", f"{B}{{\\text{{``even''}}}}", "\\text{even}", "math", None, "correct"),
    ("word-other", f"{B}{{\\text{{odd}}}}", "\\text{even}", "math", None, "wrong"),
    ("gold-unparsed-fallback", f"{B}{{5 A.M.}}", "5 a.m.", "math", None, "correct"),
    ("gold-unparsed-other", f"{B}{{5 p.m.}}", "5 a.m.", "math", None, "wrong"),
    ("number-gold-clock-answer", f"{B}{{\\text{{9:00 a.m.}}}}", "9", "math", None, "wrong"),
    ("number-gold-text-tuple", f"{B}{{\\text{{32, 349}}}}", "32349", "math", None, "wrong"),
    ("comma-space-is-tuple-math", f"{B}{{32, 349}}", "32349", "math", None, "wrong"),
    ("thousands-commas-math", f"{B}{{1,000}}", "1000", "math", None, "correct"),
    # --- pathological answers: refused before sympy ------------------------------------------
    ("power-tower", f"{B}{{10^{{10^{{10^{{10}}}}}}}}", "5", "math", None, "too_complex"),
    ("power-tower-aime", f"{B}{{10^{{10^{{10}}}}}}", "5", "aime", None, "too_complex"),
    ("huge-exponent", f"{B}{{2^{{123456789}}}}", "5", "math", None, "too_complex"),
    ("huge-factorial", f"{B}{{100000!}}", "5", "math", None, "too_complex"),
    ("factorial-exponent", f"{B}{{{{999!}}^{{999!}}}}", "5", "math", None, "too_complex"),
    ("deep-nesting", f"{B}{{{'(' * 40}x{')' * 40}}}", "x", "math", None, "too_complex"),
    ("very-long-answer", f"{B}{{{'x+' * 400}1}}", "1", "math", None, "too_complex"),
]


@pytest.mark.parametrize("response,gold,kind,finish_reason,expected",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_grade_table(response, gold, kind, finish_reason, expected):
  verdict = grade.grade(response, gold, kind, finish_reason)
  assert verdict.reason == expected, verdict
  assert verdict.correct == (expected == "correct")


def test_table_is_large_and_ids_unique():
  assert len(CASES) >= 60
  assert len({c[0] for c in CASES}) == len(CASES)


def test_extraction_details():
  e = extract.extract(f"{B}{{113}} then {B}{{ 112 }}")
  assert (e.answer, e.method, e.boxes) == ("112", "boxed", ("113", "112"))
  assert e.multiple_disagreeing_boxes and e.flags == ("multiple_disagreeing_boxes",)
  # The same answer spelled with different spacing is not a disagreement.
  e = extract.extract(f"{B}{{\\left( 1,2 \\right)}} ... {B}{{(1, 2)}}")
  assert not e.multiple_disagreeing_boxes
  e = extract.extract(f"<think>{B}{{3}}")
  assert (e.answer, e.method, e.unfinished_thinking) == (None, "unfinished_thinking", True)
  e = extract.extract(f"<think>{B}{{3}}</think> no box here")
  assert e.method == "none" and e.boxed_only_in_thinking
  e = extract.extract(f"{B}{{5}} and later {B}{{6")
  assert e.answer == "5" and e.unclosed_box
  e = extract.extract("$\\boxed{1}$, $\\boxed{2}$ and $\\boxed{3}$")
  assert e.group == ("1", "2", "3") and e.answer == "3"
  # Boxes apart in prose are revisions, not one answer.
  assert extract.extract(f"{B}{{1}}. Hmm, no.\n\n{B}{{2}}").group == ()
  assert extract.extract("The final answer is $x^2$. I hope it is correct.").answer == "x^2"
  with pytest.raises(TypeError):
    extract.extract(None)


def test_verdict_fields_and_vote_keys():
  v = grade.grade(f"{B}{{\\dfrac{{50}}{{2}}}}", "25", "aime")
  assert (v.extracted, v.vote_key, v.method) == ("\\dfrac{50}{2}", "25", "boxed")
  # A correct answer votes under the gold's key, whatever its form.
  v = grade.grade(f"{B}{{(3,\\pi/2)}}", "\\left( 3, \\frac{\\pi}{2} \\right)", "math")
  assert v.correct and v.vote_key == grade.gold_vote_key("(3, \\frac{\\pi}{2})", "math")
  assert grade.vote_key("\\frac{1}{2}", "math") == grade.vote_key("0.50", "math") == "1/2"
  assert grade.vote_key("033", "aime") == "33"
  v = grade.grade("<think>abc", "3", "aime", "length")
  assert v.vote_key is None and v.to_dict()["flags"] == ["unfinished_thinking"]


def test_normalize_text_rules_in_order():
  n = grade.normalize_text
  # 1-2. Wrappers, nested too, and spacing commands go; so do sizing commands.
  assert n("\\textbf{\\text{Tuesday}}") == n("\\mathrm{Tuesday}") == n("Tuesday")
  assert n("9:00\\ \\text{a.m.}") == n("9:00 \\text{ a.m.}") == n("\\text{9:00 a.m.}")
  # 3. Quotation marks around the answer.
  assert n('"even"') == n("``even''") == n("even")
  # 4. Multiple choice: the capital letter, or the sorted list of letters.
  assert n("\\text{(c)}") == n("\\left( C \\right)") == n("(C)\\ 12") == "C"
  assert n("(C), (A)") == n("A,C") == "A,C"
  assert n("(C) or (D)") != "C"
  # 5-7. Case, abbreviation dots, trailing punctuation.
  assert n("9:00 AM") == n("9:00 a.m.") and n("Tuesday!") == n("tuesday")
  # 8. Spacing, except where it would regroup digits.
  assert n("9 : 00 am") == n("9:00am")
  assert n("\\text{32, 349}") != n("\\text{32,349}") != n("\\text{32349}")
  assert n("1 000") != n("1000")
  # 9. A clock hour's leading zero.
  assert n("09:30 p.m.") == n("9:30 pm") != n("9:03 pm")
  # 10. A word key is marked, so it never equals a mathematical vote key.
  assert n("\\text{XY}") == "\\text{xy}" != grade.vote_key("xy", "math")


def test_text_vote_keys_group_equivalent_forms():
  groups = [["\\text{(C)}", "(C)", "C", "\\textbf{(C)}", "\\text{(C) Plane}", "\\mathrm{(C)}"],
            ["\\text{Tuesday}", "Tuesday", "tuesday.", "\\mathrm{Tuesday}"],
            ["\\text{9:00 a.m.}", "9:00 \\text{ a.m.}", "9:00 AM", "\\text{09:00 a.m.}"],
            ["\\text{A, C}", "\\text{C, A}", "(A), (C)"]]
  keys = []
  for group in groups:
    group_keys = {grade.vote_key(a, "math") for a in group}
    assert len(group_keys) == 1, (group, group_keys)
    assert group_keys == {grade.gold_vote_key(group[0], "math")}
    keys.append(group_keys.pop())
  others = ["(D)", "Thursday", "9:00 \\text{ p.m.}", "\\text{A}", "9:00"]
  assert len(set(keys) | {grade.vote_key(a, "math") for a in others}) == len(keys) + len(others)
  # Wrong answers of one choice vote together however they are written, and outvote the rest.
  verdicts = [grade.grade(f"{B}{{{a}}}", "\\text{(C)}", "math")
              for a in ("(C)", "C", "(D)", "B", "\\textbf{(B)}", "(B)")]
  assert [v.correct for v in verdicts] == [True, True, False, False, False, False]
  assert metrics.majority_vote(verdicts).extracted == "B"
  # Numbers keep the keys they had before text answers had their own rules.
  numeric = {"1,000": "1000", "32, 349": "32,349", "32,349": "32349", "\\text{13}": "13",
             "5.4 \\text{ cents}": "27/5", "0.50": "1/2", "x = 3": "3", "(1, 2)": "(1,2)",
             "15\\mbox{ cm}^2": "15", "\\frac{270}7\\text{ degrees}": "270/7", "p - q": "p-q"}
  assert {a: grade.vote_key(a, "math") for a in numeric} == numeric


def test_bundled_math500_text_golds():
  # Every MATH-500 gold written with a text wrapper grades itself and its natural variants as
  # correct, and a different choice or word as wrong; words and choices never reach sympy.
  items = [i for i in tasks.load_task("math500")
           if re.search(r"\\(?:text|mbox|textbf|mathrm)\{", i["answer"])]
  assert len(items) >= 12
  checked = 0
  with grade.SymbolicChecker(timeout_s=0.001) as no_symbolic:  # any symbolic call times out
    for item in items:
      gold = item["answer"]
      right, wrong, checker = [gold], [], no_symbolic
      if m := re.fullmatch(r"\\text\{\(([A-E])\)\}", gold):
        letter = m.group(1)
        other = "A" if letter != "A" else "B"
        right += [letter, f"({letter})", f"\\textbf{{({letter})}}", f"\\text{{{letter}}}",
                  f"({letter.lower()})", f"\\textbf{{({letter})}}\\ \\text{{Plane}}"]
        wrong += [other, f"({other})", f"\\textbf{{({other})}}", f"({letter}) or ({other})"]
      elif m := re.fullmatch(r"\\text\{([A-Za-z]+)\}", gold):
        word = m.group(1)
        right += [word, word.lower(), word.capitalize(), word.upper(), f"\\textbf{{{word}}}",
                  f"\\mathrm{{{word}}}", f"\\text{{{word}.}}", f'"{word}"']
        wrong += ["Carla", "west", "odd", "parabola", word + "s", word[::-1]]
      else:  # a number with a unit: the number alone is right, another number is not
        number = grade.normalize_math(gold)
        right, wrong, checker = right + [number], [number + "1"], None
      for answer in right:
        reason, details = grade.compare_answers(answer, gold, "math", checker=checker)
        assert reason == "correct", (gold, answer, details)
      for answer in wrong:
        reason, details = grade.compare_answers(answer, gold, "math", checker=checker)
        assert reason == "wrong", (gold, answer, details)
      checked += len(right) + len(wrong)
  assert checked > 100


@pytest.mark.parametrize("gold,kind", [("x", "aime"), ("1000", "aime"), ("-1", "aime"),
                                       ("2.5", "amc"), ("", "math"), ("5", "gsm8k")])
def test_bad_gold_is_an_error(gold, kind):
  with pytest.raises(ValueError):
    grade.grade(f"{B}{{5}}", gold, kind)


def test_bundled_math500_solutions_box_their_answers():
  # Real LaTeX for the brace matcher: each MATH-500 answer is the last box of its solution.
  items = tasks.load_task("math500")
  for item in items:
    assert extract.extract(item["solution"]).answer == item["answer"].strip(), item["id"]
  # No gold answer of the bundled sets trips the size bounds, and every gold is valid.
  for item in items:
    assert grade.too_complex(grade.strip_decorations(item["answer"])) is None, item["answer"]
  for name, kind in (("aime24", "aime"), ("aime25", "aime"), ("amc23", "amc")):
    for item in tasks.load_task(name):
      assert grade.grade(f"{B}{{{item['answer']}}}", item["answer"], kind).correct


def test_pathological_inputs_are_fast():
  # Refused by the bounds or linear extraction: each well under a second, no worker needed.
  cases = [
      (f"{B}{{10^{{10^{{10^{{10}}}}}}}}", "5", "math"),
      (f"{B}{{" * 100_000, "5", "math"),  # 100k unclosed boxes
      (f"{B}{{" * 50_000 + "5" + "}" * 50_000, "5", "aime"),  # a tower of 50k nested boxes
      ("{" * 200_000 + f"{B}{{5}}", "5", "aime"),
      ("the answer is $" * 50_000, "5", "aime"),
      (f"{B}{{" + "\\text{ a" * 10_000 + "}", "5", "math"),
      (f"<think>{'x ' * 500_000}", "5", "aime"),
  ]
  for response, gold, kind in cases:
    start = time.perf_counter()
    grade.grade(response, gold, kind)
    assert time.perf_counter() - start < 2.0, response[:40]


def test_worker_timeout_kills_and_recovers():
  # Past the bounds' reach (they are bypassed here): the worker is killed at its deadline and a
  # fresh one answers the next request.
  with grade.SymbolicChecker(timeout_s=1.0) as checker:
    assert checker.run(("equal", "1", "1", False)) == ("ok", (True, None))
    start = time.perf_counter()
    assert checker.run(("equal", "1", "10^{10^{10}}", False)) == ("timeout", None)
    assert time.perf_counter() - start < 5.0
    assert checker.run(("equal", "\\frac12", "0.5", False)) == ("ok", (True, None))


def pool_grade_default(response, gold, kind):
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(grade.grade, response, gold, kind).result()


def test_grading_from_worker_threads_is_bounded():
  # Nothing relies on signal.alarm, so threads work; a comparison that passes the bounds but
  # takes sympy too long ends as "timeout" at the checker's deadline.
  jobs = [(f"{B}{{(x+1)^{{3000}}}}", "x^{3000}+1", "math", "timeout"),
          (f"{B}{{(3,\\pi/2)}}", "(3, \\frac{\\pi}{2})", "math", "correct"),
          (f"{B}{{2^{{10}}-1000}}", "24", "aime", "correct"),
          (f"{B}{{10^{{10^{{10}}}}}}", "5", "math", "too_complex"),
          (f"{B}{{\\sec^2 y}}", "\\tan^2 y + 1", "math", "correct"),
          (f"{B}{{3,4}}", "34", "aime", "wrong")]
  with grade.SymbolicChecker(workers=2, timeout_s=1.5) as checker:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      verdicts = list(pool.map(lambda j: grade.grade(j[0], j[1], j[2], checker=checker), jobs))
    assert time.perf_counter() - start < 15.0
    assert [v.reason for v in verdicts] == [j[3] for j in jobs]
    # The process-wide default checker works from a thread too.
    assert pool_grade_default("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", "math").correct
    # grade_all gives the same verdicts, in order, with threads.
    again = grade.grade_all([(j[0], j[1], None) for j in jobs[1:3]], "math", checker=checker,
                            threads=2)
    assert [v.reason for v in again] == ["correct", "correct"]
