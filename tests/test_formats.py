"""Trace formats -> conversations: golden records per format, remapping, filtering, bad input."""

import dataclasses

import numpy as np
import pytest

from configs import base
from jaxdistill.data.formats import (DEFAULT_SPEC, FORMATS, FormatError, detect_format,
                                     parse_spec, to_conversations, validate_conversation)

STILL2_SYSTEM = ("Your role as an assistant involves thoroughly exploring questions through a "
                 "systematic long thinking process before providing the final precise and "
                 "accurate solutions.")
QUESTION = "Return your final response within \\boxed{}. What is the smallest prime above 20?"
STRATOS_ANSWER = ("<|begin_of_thought|>\n\nPrimes above 20: 21 = 3 * 7 is not prime, 22 is "
                  "even, 23 has no divisor up to 4.\n\n<|end_of_thought|>\n\n"
                  "<|begin_of_solution|>\n\nThe smallest prime above 20 is \\boxed{23}."
                  "\n\n<|end_of_solution|>")


def _spec(**kw):
  return dataclasses.replace(DEFAULT_SPEC, **kw)


def user(text):
  return {"role": "user", "content": text}


def assistant(text):
  return {"role": "assistant", "content": text}


def system(text):
  return {"role": "system", "content": text}


# -- Golden records, one per format -----------------------------------------------------------

def test_messages_numinamath_record():
  record = {"source": "amc_aime", "problem": "Compute $2^{10}$.",
            "solution": "We have $2^{10} = 1024$, so the answer is $\\boxed{1024}$.",
            "messages": [{"role": "user", "content": "Compute $2^{10}$."},
                         {"role": "assistant",
                          "content": "We have $2^{10} = 1024$, so the answer is "
                                     "$\\boxed{1024}$."}]}
  assert detect_format(record) == "messages"
  assert to_conversations(record) == [[
      user("Compute $2^{10}$."),
      assistant("We have $2^{10} = 1024$, so the answer is $\\boxed{1024}$.")]]


def test_messages_keep_system_and_drop_extra_keys():
  record = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "1+1?", "name": "alice"},
                         {"role": "assistant", "content": "2", "weight": 1.0},
                         {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}]}
  assert to_conversations(record, "messages") == [[
      system("Be brief."), user("1+1?"), assistant("2"), user("2+2?"), assistant("4")]]


def test_sharegpt_bespoke_stratos_record_keeps_delimiters_and_system():
  record = {"system": STILL2_SYSTEM,
            "conversations": [{"from": "user", "value": QUESTION},
                              {"from": "assistant", "value": STRATOS_ANSWER}]}
  assert detect_format(record) == "sharegpt"
  [conversation] = to_conversations(record)
  assert conversation == [system(STILL2_SYSTEM), user(QUESTION), assistant(STRATOS_ANSWER)]
  assert conversation[-1]["content"].startswith("<|begin_of_thought|>\n\n")
  assert conversation[-1]["content"].endswith("\n\n<|end_of_solution|>")


def test_sharegpt_human_gpt_speakers_and_empty_system():
  record = {"system": "", "conversations": [{"from": "human", "value": "hi"},
                                            {"from": "gpt", "value": "hello"},
                                            {"from": "human", "value": "bye"},
                                            {"from": "gpt", "value": "bye!"}]}
  # An empty system column is "no system prompt", not an empty system message.
  assert to_conversations(record) == [[user("hi"), assistant("hello"), user("bye"),
                                       assistant("bye!")]]


def test_sharegpt_preferred_over_mirrored_messages():
  # The HuggingFaceH4 mirror of Bespoke-Stratos adds `messages`, without the system prompt.
  record = {"system": STILL2_SYSTEM,
            "conversations": [{"from": "user", "value": QUESTION},
                              {"from": "assistant", "value": STRATOS_ANSWER}],
            "messages": [user(QUESTION), assistant(STRATOS_ANSWER)]}
  assert detect_format(record) == "sharegpt"
  assert to_conversations(record)[0][0] == system(STILL2_SYSTEM)


def _s1k_record():
  return {"solution": "23", "question": "What is the smallest prime above 20?",
          "cot_type": "math", "source_type": "AI-MO/NuminaMath-CoT/aops_forum",
          "metadata": "{'problem': '...'}", "cot": None,
          "thinking_trajectories": ["  21 is 3 times 7.", "22 is even. 23 is prime.\n"],
          "attempt": "The answer is $\\boxed{23}$.\n"}


def test_s1k_wraps_joined_thinking():
  record = _s1k_record()
  assert detect_format(record) == "s1k"
  assert to_conversations(record) == [[
      user("What is the smallest prime above 20?"),
      assistant("<think>\n21 is 3 times 7.\n22 is even. 23 is prime.\n</think>\n\n"
                "The answer is $\\boxed{23}$.")]]


def test_s1k_with_s1_wrapper_and_system_prompt():
  spec = _spec(thinking_open="<|im_start|>think\n",
               thinking_close="\n<|im_start|>answer\nAnswer: ",
               system_prompt="Please reason step by step.")
  [conversation] = to_conversations(_s1k_record(), "s1k", spec)
  assert conversation[0] == system("Please reason step by step.")
  assert conversation[2]["content"] == (
      "<|im_start|>think\n21 is 3 times 7.\n22 is even. 23 is prime.\n"
      "<|im_start|>answer\nAnswer: The answer is $\\boxed{23}$.")


def _s1k11_record():
  return {"solution": "23", "question": "Smallest prime above 20?", "cot_type": "math",
          "source_type": "x", "metadata": "{}",
          "gemini_thinking_trajectory": "Gemini thinks.", "gemini_attempt": "Gemini: 23",
          "deepseek_thinking_trajectory": "DeepSeek thinks.", "deepseek_attempt": "DS: 23",
          "gemini_grade": "Yes", "deepseek_grade": "Yes"}


@pytest.mark.parametrize("variant,thinking,answer", [
    ("auto", "DeepSeek thinks.", "DS: 23"),
    ("deepseek", "DeepSeek thinks.", "DS: 23"),
    ("gemini", "Gemini thinks.", "Gemini: 23"),
])
def test_s1k11_variants(variant, thinking, answer):
  [conversation] = to_conversations(_s1k11_record(), spec=_spec(s1k_variant=variant))
  assert conversation[-1]["content"] == f"<think>\n{thinking}\n</think>\n\n{answer}"


def test_s1k_with_both_versions_defaults_to_deepseek_and_can_pick_original():
  record = {**_s1k_record(), **_s1k11_record()}
  assert "DeepSeek thinks." in to_conversations(record)[0][-1]["content"]
  original = to_conversations(record, spec=_spec(s1k_variant="original"))
  assert "21 is 3 times 7." in original[0][-1]["content"]


def test_s1k_variant_missing_fields():
  with pytest.raises(FormatError, match="missing field 'thinking_trajectories'"):
    to_conversations(_s1k11_record(), spec=_spec(s1k_variant="original"))
  with pytest.raises(ValueError, match="s1k_variant"):
    _spec(s1k_variant="claude")


@pytest.mark.parametrize("record", [
    {"question": "Find $x$ if $2x = 6$.", "solution": "Divide by 2: $x = \\boxed{3}$.",
     "answer": "3"},                                                      # LIMO
    {"source": "olympiads", "problem": "Find $x$ if $2x = 6$.",
     "solution": "Divide by 2: $x = \\boxed{3}$."},                      # NuminaMath, no messages
])
def test_problem_solution(record):
  assert detect_format(record) == "problem_solution"
  assert to_conversations(record) == [[user("Find $x$ if $2x = 6$."),
                                       assistant("Divide by 2: $x = \\boxed{3}$.")]]


def _openr1_record(**overrides):
  record = {"problem": "Compute $1 + 2 + 3$.", "solution": "6", "answer": "6",
            "problem_type": "Algebra", "question_type": "math-word-problem",
            "source": "olympiads", "uuid": "0c6f",
            "is_reasoning_complete": [True, True, True],
            "generations": ["<think>\n1 + 2 = 3, 3 + 3 = 6.\n</think>\n\n$\\boxed{6}$",
                            "<think>\nIt is 7.\n</think>\n\n$\\boxed{7}$",
                            "<think>\nSum of 1..3 is 3*4/2 = 6.\n</think>\n\n$\\boxed{6}$"],
            "correctness_math_verify": [True, False, True], "correctness_llama": None,
            "finish_reasons": ["stop", "stop", "stop"], "correctness_count": 2,
            "messages": [user("Compute $1 + 2 + 3$."), assistant("chosen")]}
  record.update(overrides)
  return record


def test_openr1_keeps_only_verified_generations():
  record = _openr1_record()
  assert detect_format(record) == "openr1"
  conversations = to_conversations(record)
  assert [c[-1]["content"] for c in conversations] == [record["generations"][0],
                                                       record["generations"][2]]
  assert all(c[0] == user("Compute $1 + 2 + 3$.") for c in conversations)


def test_openr1_zero_or_all():
  assert to_conversations(_openr1_record(correctness_math_verify=[False] * 3)) == []
  assert len(to_conversations(_openr1_record(correctness_math_verify=None))) == 3
  record = _openr1_record()
  del record["correctness_math_verify"]
  assert len(to_conversations(record)) == 3


def test_openr1_parquet_numpy_columns():
  record = _openr1_record(generations=np.array(_openr1_record()["generations"], dtype=object),
                          correctness_math_verify=np.array([True, False, True]))
  assert len(to_conversations(record)) == 2


def test_openr1_chosen_messages_when_asked():
  assert to_conversations(_openr1_record(), "messages")[0][-1] == assistant("chosen")


# -- Field remapping --------------------------------------------------------------------------

def test_field_map_remaps_and_detects():
  spec = _spec(field_map={"question": "prompt", "solution": "response"})
  record = {"prompt": "2 + 2?", "response": "4"}
  assert detect_format(record, spec) == "problem_solution"
  assert to_conversations(record, spec=spec) == [[user("2 + 2?"), assistant("4")]]
  with pytest.raises(FormatError, match="unknown schema"):
    detect_format(record)


def test_field_map_message_keys():
  spec = _spec(field_map={"conversations": "turns", "from": "speaker", "value": "text"})
  record = {"turns": [{"speaker": "human", "text": "hi"}, {"speaker": "gpt", "text": "yo"}]}
  assert to_conversations(record, spec=spec) == [[user("hi"), assistant("yo")]]


def test_openthoughts_metadata_through_s1k_remap():
  spec = _spec(field_map={"question": "problem", "thinking_trajectories": "deepseek_reasoning",
                          "attempt": "deepseek_solution"}, s1k_variant="original")
  record = {"problem": "Is 91 prime?", "deepseek_reasoning": "91 = 7 * 13.",
            "deepseek_solution": "No.", "ground_truth_solution": "No", "domain": "math"}
  assert to_conversations(record, "s1k", spec) == [[
      user("Is 91 prime?"), assistant("<think>\n91 = 7 * 13.\n</think>\n\nNo.")]]


def test_spec_copies_field_map():
  field_map = {"question": "prompt"}
  spec = _spec(field_map=field_map)
  field_map["question"] = "other"
  assert spec.name("question") == "prompt"


def test_parse_spec_reads_settings_written_as_strings():
  # A run's data.* defaults (configs/base.py) are the library's DEFAULT_SPEC.
  d = base.get_config().data
  assert parse_spec(d.fields, d.thinking_open, d.thinking_close, d.system_prompt,
                    d.s1k_variant) == DEFAULT_SPEC
  spec = parse_spec(" question=query, thinking_trajectories=reasoning,attempt=final ", "<r>",
                    "</r>", "Be brief.", "original")
  assert spec == _spec(field_map={"question": "query", "thinking_trajectories": "reasoning",
                                  "attempt": "final"}, thinking_open="<r>", thinking_close="</r>",
                       system_prompt="Be brief.", s1k_variant="original")
  record = {"query": "2 + 2?", "reasoning": ["Add.", "Four."], "final": "4"}
  assert to_conversations(record, spec=spec) == [[
      system("Be brief."), user("2 + 2?"), assistant("<r>Add.\nFour.</r>4")]]


@pytest.mark.parametrize("fields,variant,system_prompt,message", [
    ("questoin=query", "auto", "", r"data\.fields: unknown canonical field 'questoin'; the "
     r"canonical names are messages, .*, question,"),
    ("query=question,final=attempt", "auto", "",
     r"'query', 'final' \(the canonical name comes first: question=query,attempt=final\?\)"),
    ("question", "auto", "", r"data\.fields: 'question' is not canonical=theirs \(write e\.g\. "
     r"data\.fields=question=query,solution=final\)"),
    ("question=a,question=b", "auto", "", r"'question' is renamed twice \('a' and 'b'\)"),
    ("", "claude", "", r"data\.s1k_variant='claude' is not one of \('auto', 'deepseek'"),
    ("", "auto", "  ", r"data\.system_prompt is blank; set it to \"\" for no system prompt"),
])
def test_parse_spec_refuses_bad_settings_saying_what_to_change(fields, variant, system_prompt,
                                                               message):
  with pytest.raises(ValueError, match=message):
    parse_spec(fields, "<think>", "</think>", system_prompt, variant, prefix="data.")


def test_system_prompt_added_only_when_missing():
  spec = _spec(system_prompt="Reason step by step.")
  record = {"question": "q?", "solution": "a."}
  assert to_conversations(record, spec=spec)[0][0] == system("Reason step by step.")
  own = {"messages": [system("Mine."), user("q?"), assistant("a.")]}
  assert to_conversations(own, spec=spec)[0][0] == system("Mine.")


# -- Bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("record,fmt,reason", [
    ({"solution": "x"}, "problem_solution", "missing field 'question'"),
    ({"question": None, "solution": "x"}, "problem_solution", "missing field 'question'"),
    ({"question": "q"}, "problem_solution", "missing field 'solution'"),
    ({"question": 3, "solution": "x"}, "problem_solution",
     "field 'question' is not a string \\(got int\\)"),
    ({"conversations": "hi"}, "sharegpt", "field 'conversations' is not a list"),
    ({"conversations": [{"from": "user", "value": "q"}, {"from": "gpt", "value": "  "}]},
     "sharegpt", "empty assistant turn"),
    ({"conversations": [{"from": "user", "value": ""}, {"from": "gpt", "value": "a"}]},
     "sharegpt", "empty user turn"),
    ({"conversations": [{"from": "bot", "value": "q"}]}, "sharegpt", "unknown speaker 'bot'"),
    ({"conversations": [{"from": "user"}]}, "sharegpt", "turn 0: missing key 'value'"),
    ({"conversations": ["hi"]}, "sharegpt", "turn 0 is not an object \\(got str\\)"),
    ({"system": 5, "conversations": []}, "sharegpt", "field 'system' is not a string"),
    ({"messages": []}, "messages", "empty conversation"),
    ({"messages": [user("q")]}, "messages", "does not end with an assistant turn"),
    ({"messages": [assistant("a")]}, "messages", "'assistant' where 'user' was expected"),
    ({"messages": [user("q"), user("q2"), assistant("a")]}, "messages",
     "turn 1: 'user' where 'assistant' was expected"),
    ({"messages": [user("q"), system("s"), assistant("a")]}, "messages",
     "system message after the first turn"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "unknown role 'tool'"),
    ({"messages": [user("q"), {"role": "assistant", "content": None}]}, "messages",
     "content is not a string \\(got NoneType\\)"),
    ({"messages": [user("q"), assistant("")]}, "messages", "empty assistant turn"),
    ({"question": "q", "thinking_trajectories": [], "attempt": "a"}, "s1k",
     "empty thinking in field 'thinking_trajectories'"),
    ({"question": "q", "thinking_trajectories": ["t", 3], "attempt": "a"}, "s1k",
     "not a list of strings"),
    ({"question": "q", "thinking_trajectories": ["t"], "attempt": " "}, "s1k",
     "empty answer in field 'attempt'"),
    ({"question": "q", "thinking_trajectories": ["t"]}, "s1k", "missing field 'attempt'"),
    (_openr1_record(correctness_math_verify=[True]), "openr1", "has 1 entries for 3"),
    (_openr1_record(correctness_math_verify=["yes"] * 3), "openr1", "not a list of booleans"),
    (_openr1_record(generations=["<think>\nok\n</think>\n\n6", ""],
                    correctness_math_verify=[True, True]), "openr1", "empty assistant turn"),
    ({"id": 1, "text": "hello"}, "auto", r"unknown schema: fields \['id', 'text'\]"),
    (["not", "a", "dict"], "auto", "record is not an object \\(got list\\)"),
])
def test_bad_records(record, fmt, reason):
  with pytest.raises(FormatError, match=reason):
    to_conversations(record, fmt)


def test_unknown_format_is_a_programming_error():
  with pytest.raises(ValueError, match="unknown format 'alpaca'") as info:
    to_conversations({"question": "q", "solution": "a"}, "alpaca")
  assert not isinstance(info.value, FormatError)
  assert "alpaca" not in FORMATS


def test_validate_conversation_accepts_good_shapes():
  validate_conversation([user("q"), assistant("a")])
  validate_conversation([system("s"), user("q"), assistant("a"), user("q"), assistant("a")])
