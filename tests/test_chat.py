"""Chat rendering and the assistant-only loss mask on offline Qwen2.5, Llama 3, SentencePiece."""

import json
import logging
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import transformers

from jaxdistill.data import chat
from jaxdistill.data import tokenizer as tokenizer_lib
from jaxdistill.data.chat import ChatRenderer, NoScoredTokensError, TemplateError, load_tokenizer
from jaxdistill.data.formats import FormatError, to_conversations
from tests import data_fixtures as fx

DATE = {"date_string": "26 Jul 2024"}
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QUESTION = "We have $x + y = 10$ and $xy = 21$. Find the larger of $x$ and $y$."
ANSWER = ("<think>\nOkay, so $x$ and $y$ are the roots of $t^2 - 10t + 21 = 0$, which are 3 "
          "and 7.\n\nWait, let me check again: 3 * 7 = 21 and 3 + 7 = 10. Yes.\n</think>\n\n"
          "The larger one is $\\boxed{7}$.")


def msg(role, content):
  return {"role": role, "content": content}


SINGLE = [msg("user", QUESTION), msg("assistant", ANSWER)]
WITH_SYSTEM = [msg("system", SYSTEM)] + SINGLE
MULTI = WITH_SYSTEM + [msg("user", "Café? Now the smaller one, π ≈ 3.14 🙂 数学."),
                       msg("assistant", "<think>\nThe other root.\n</think>\n\nIt is 3.")]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  return {
      "qwen": fx.save_qwen25_tokenizer(root / "qwen"),
      "qwen_instruct": fx.save_qwen25_tokenizer(root / "qwen_instruct", instruct=True),
      "qwen_plain": fx.save_qwen25_tokenizer(root / "qwen_plain", template=None),
      "qwen_truncating": fx.save_qwen25_tokenizer(root / "qwen_trunc", truncate_at=8),
      "llama31": fx.save_llama3_tokenizer(root / "llama31"),
      "llama31_base": fx.save_llama3_tokenizer(root / "llama31_base", instruct=False),
      "llama30": fx.save_llama3_tokenizer(root / "llama30", template=fx.LLAMA3_CHAT_TEMPLATE),
      "llama_plain": fx.save_llama3_tokenizer(root / "llama_plain", template=None),
      "sp": fx.save_sentencepiece_model(root / "chatml.model"),
      "sp_default": fx.save_sentencepiece_model(root / "default.model", chatml_ready=False),
  }


@pytest.fixture(scope="module")
def toks(dirs):
  return {name: load_tokenizer(path) for name, path in dirs.items()}


def runs(mask):
  """[start, end) of each run of True in `mask`."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
  return list(zip(edges[::2], edges[1::2]))


def scored_texts(tok, example):
  return [tok.decode(example.tokens[a:b]) for a, b in runs(example.loss_mask)]


# -- Tokenizer wrapper ------------------------------------------------------------------------

def test_hf_tokenizer_matches_transformers_without_implicit_bos(dirs, toks):
  tok = toks["llama31"]
  hf = transformers.AutoTokenizer.from_pretrained(dirs["llama31"])
  text = "Hello <|eot_id|> world\n\nCafé π 🙂"
  assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
  assert hf.encode(text)[0] == tok.bos_id != tok.encode(text)[0]  # the backend adds BOS
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode("<|eot_id|>") == [tok.token_to_id("<|eot_id|>")]
  assert tok.token_to_id("<|im_end|>") is None
  assert tok.id_to_token(tok.token_to_id("<|eot_id|>")) == "<|eot_id|>"
  assert tok.vocab_size == len(hf)
  assert tok.eos_id == tok.token_to_id("<|eot_id|>")
  assert tok.chat_template == fx.LLAMA31_CHAT_TEMPLATE


@pytest.mark.parametrize("tokenizer_class", [None, "PreTrainedTokenizerFast", "Qwen2Tokenizer"])
def test_hf_tokenizer_reads_what_transformers_reads(dirs, tmp_path, tokenizer_class):
  """Every field the wrapper exposes equals what transformers' AutoTokenizer loads, whether
  the directory is read by `tokenizers` alone (the classes that take tokenizer.json as
  written) or through transformers (any other class)."""
  text = "Hello <|eot_id|> <|im_end|> world\n\nCafé π 🙂 \\boxed{42}"
  for name in ("qwen", "qwen_instruct", "llama31", "llama31_base", "llama_plain"):
    directory = dirs[name]
    if tokenizer_class:
      directory = tmp_path / f"{name}_{tokenizer_class}"
      shutil.copytree(dirs[name], directory)
      config_file = directory / "tokenizer_config.json"
      config = json.loads(config_file.read_text())
      config["tokenizer_class"] = tokenizer_class
      config_file.write_text(json.dumps(config))
    ours = load_tokenizer(directory)
    read = tokenizer_lib._read_verbatim  # pylint: disable=protected-access
    verbatim = read(str(directory)) is not None
    assert verbatim == (tokenizer_class != "Qwen2Tokenizer"), name
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False), name
    assert ours.vocab_size == len(hf)
    assert (ours.eos_id, ours.pad_id, ours.bos_id) == (
        hf.eos_token_id, hf.pad_token_id, hf.bos_token_id), name
    names = tokenizer_lib._SPECIAL_NAMES  # pylint: disable=protected-access
    assert ours.special_tokens == {k: getattr(hf, k) for k in names
                                   if getattr(hf, k) is not None}, name
    assert ours.chat_template == (hf.chat_template or None), name


def test_hf_tokenizer_loads_without_transformers(dirs):
  """A tokenizer.json taken as written is loaded without importing transformers (nor the
  PyTorch it imports): seconds of every tool's start."""
  code = ("import sys; from jaxdistill.data import chat; "
          f"tok = chat.load_tokenizer({str(dirs['qwen_instruct'])!r}); "
          "assert tok.chat_template and tok.eos_id is not None; "
          "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_hf_tokenizer_special_ids(toks):
  qwen = toks["qwen"]
  assert qwen.eos_id == qwen.pad_id == qwen.token_to_id("<|endoftext|>")
  assert qwen.bos_id is None
  assert toks["qwen_instruct"].eos_id == qwen.token_to_id("<|im_end|>")
  assert toks["qwen_plain"].chat_template is None


def test_tokenizer_json_truncation_is_ignored(toks):
  text = "Let me think step by step.\n\nFirst, we compute the sum of the digits."
  ids = toks["qwen"].encode(text)
  assert len(ids) > 8
  assert toks["qwen_truncating"].encode(text) == ids


def test_load_tokenizer_rejects_other_paths(tmp_path):
  (tmp_path / "vocab.txt").write_text("a\n")
  with pytest.raises(FileNotFoundError):
    load_tokenizer(tmp_path / "vocab.txt")


# -- Jinja templates: golden text, parity with transformers ------------------------------------

def test_qwen25_golden_text_and_default_system(toks):
  renderer = ChatRenderer(toks["qwen_instruct"])
  assert renderer.template_name == "tokenizer"
  assert renderer.render_text(SINGLE) == (
      f"<|im_start|>system\n{fx.QWEN_DEFAULT_SYSTEM}<|im_end|>\n"
      f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
      f"<|im_start|>assistant\n{ANSWER}<|im_end|>\n")
  assert renderer.render_text(WITH_SYSTEM[:2], add_generation_prompt=True) == (
      f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
      "<|im_start|>assistant\n")


def test_llama31_golden_text(toks):
  renderer = ChatRenderer(toks["llama31"], template_kwargs=DATE)
  assert renderer.render_text(WITH_SYSTEM) == (
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
      "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
      f"{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
      f"<|start_header_id|>assistant<|end_header_id|>\n\n{ANSWER}<|eot_id|>")


@pytest.mark.parametrize("name,kwargs", [("qwen", {}), ("llama31", DATE), ("llama30", {})])
@pytest.mark.parametrize("conversation", [SINGLE, WITH_SYSTEM, MULTI])
def test_jinja_text_and_tokens_match_transformers(dirs, toks, name, kwargs, conversation):
  hf = transformers.AutoTokenizer.from_pretrained(dirs[name])
  renderer = ChatRenderer(toks[name], template_kwargs=kwargs)
  for generation_prompt, messages in ((False, conversation), (True, conversation[:-1])):
    assert renderer.render_text(messages, generation_prompt) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
  expected = hf.apply_chat_template(conversation, **kwargs)["input_ids"]
  assert renderer.render(conversation).tokens.tolist() == list(expected)


# -- The mask ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,template,turn_end,trim", [
    ("qwen", "auto", "<|im_end|>", False),
    ("qwen", "chatml", "<|im_end|>", False),
    ("llama31", "auto", "<|eot_id|>", True),
    ("llama30", "auto", "<|eot_id|>", True),
    ("llama31", "llama3", "<|eot_id|>", True),
])
def test_mask_is_assistant_content_plus_turn_end(toks, name, template, turn_end, trim):
  tok = toks[name]
  renderer = ChatRenderer(tok, template, template_kwargs=DATE)
  assert renderer.turn_end == turn_end
  for conversation in (SINGLE, WITH_SYSTEM, MULTI):
    example = renderer.render(conversation)
    assert example.tokens.dtype == np.int32 and example.loss_mask.dtype == np.bool_
    assert example.tokens.shape == example.loss_mask.shape
    contents = [m["content"] for m in conversation if m["role"] == "assistant"]
    expected = [(c.strip() if trim else c) + turn_end for c in contents]
    assert scored_texts(tok, example) == expected
    assert tok.decode(example.tokens[example.loss_mask]) == "".join(expected)
    # Each scored run starts where the tokens of its prompt end, and that prompt is what a
    # sampler feeds: the training prompt equals the inference prompt.
    assistant_at = [k for k, m in enumerate(conversation) if m["role"] == "assistant"]
    for (start, end), k in zip(runs(example.loss_mask), assistant_at):
      prompt = renderer.encode_prompt(conversation[:k])
      np.testing.assert_array_equal(example.tokens[:start], prompt)
      assert example.tokens[end - 1] == renderer.turn_end_id
    assert example.prompt_len == runs(example.loss_mask)[0][0]
    assert tok.decode(example.tokens) == renderer.render_text(conversation)


def test_score_last_only(toks):
  renderer = ChatRenderer(toks["qwen"], score="last")
  example = renderer.render(MULTI)
  assert scored_texts(toks["qwen"], example) == [MULTI[-1]["content"] + "<|im_end|>"]


def test_builtin_chatml_equals_qwen25_template_when_system_given(toks):
  jinja = ChatRenderer(toks["qwen"], "tokenizer")
  builtin = ChatRenderer(toks["qwen"], "chatml")
  for conversation in (WITH_SYSTEM, MULTI):
    a, b = jinja.render(conversation), builtin.render(conversation)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
  # Without one, Qwen's template writes its default system prompt; ChatML writes none.
  assert fx.QWEN_DEFAULT_SYSTEM in jinja.render_text(SINGLE)
  assert builtin.render_text(SINGLE).startswith("<|im_start|>user\n")


def test_builtin_llama3_equals_llama3_template(toks):
  jinja = ChatRenderer(toks["llama30"], "tokenizer")
  builtin = ChatRenderer(toks["llama30"], "llama3")
  padded = [msg("user", "  2 + 2?\n"), msg("assistant", "\n 4 \n")]  # Llama 3 trims
  for conversation in (SINGLE, WITH_SYSTEM, MULTI, padded):
    a, b = jinja.render(conversation), builtin.render(conversation)
    assert jinja.render_text(conversation) == builtin.render_text(conversation)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
  assert builtin.render_text(SINGLE, True).endswith(
      "<|start_header_id|>assistant<|end_header_id|>\n\n")
  assert scored_texts(toks["llama30"], builtin.render(padded)) == ["4<|eot_id|>"]


def test_generation_markers_are_accepted(toks):
  marked = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}"
            "{% if m.role == 'assistant' %}{% generation %}{{ m.content + '<|im_end|>' }}"
            "{% endgeneration %}{% else %}{{ m.content + '<|im_end|>' }}{% endif %}"
            "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|im_start|>assistant\n' }}{% endif %}")
  a = ChatRenderer(toks["qwen"], marked).render(MULTI)
  b = ChatRenderer(toks["qwen"], "chatml").render(MULTI)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.loss_mask, b.loss_mask)


def test_bpe_merge_across_the_boundary(toks, caplog):
  tok = toks["qwen"]
  # ChatML's header ends in "\n"; content starting with "\n" makes one "\n\n" token.
  conversation = [msg("user", "2 + 2?"), msg("assistant", "\n\nThe answer is 4.")]
  header_end = tok.encode("\n\n")
  assert len(header_end) == 1
  renderer = ChatRenderer(tok, "chatml")
  with caplog.at_level(logging.WARNING):
    example = renderer.render(conversation)
  assert renderer.counts["split_boundary"] == 1
  assert "crosses a prompt/answer boundary" in caplog.text
  assert scored_texts(tok, example) == ["\n\nThe answer is 4.<|im_end|>"]
  np.testing.assert_array_equal(example.tokens[:example.prompt_len],
                                renderer.encode_prompt(conversation[:1]))
  assert tok.decode(example.tokens) == renderer.render_text(conversation)
  with pytest.raises(TemplateError, match="BPE merge crosses"):
    ChatRenderer(tok, "chatml", boundary="error").render(conversation)


# -- Templates that rewrite assistant turns ----------------------------------------------------

def test_template_stripping_earlier_thinking_scores_last_turn_only(toks, caplog):
  tok = toks["qwen"]
  renderer = ChatRenderer(tok, fx.CHATML_STRIP_EARLIER_THINKING)
  assert renderer.template_name == "jinja"
  with caplog.at_level(logging.WARNING):
    example = renderer.render(MULTI)
  assert "left unscored" in caplog.text
  assert renderer.counts["unscored_rewritten_turn"] == 1
  assert scored_texts(tok, example) == [MULTI[-1]["content"] + "<|im_end|>"]
  text = renderer.render_text(MULTI)
  assert "The larger one is" in text and "roots of" not in text  # thinking dropped


def test_template_stripping_last_thinking_is_an_error(toks):
  renderer = ChatRenderer(toks["qwen"], fx.CHATML_STRIP_ALL_THINKING)
  with pytest.raises(TemplateError, match="rewrites the last assistant turn"):
    renderer.render(SINGLE)


# -- Template choice, turn end and EOS ---------------------------------------------------------

@pytest.mark.parametrize("name,expected", [("qwen", "tokenizer"), ("qwen_plain", "chatml"),
                                           ("llama_plain", "llama3"), ("sp", "chatml")])
def test_auto_template(toks, name, expected):
  assert ChatRenderer(toks[name]).template_name == expected


def test_template_errors(tmp_path, toks):
  bare = fx.save_hf_tokenizer(fx.train_bpe(fx.QWEN2_PATTERN, ["<|endoftext|>"]),
                              tmp_path / "bare", None, eos_token="<|endoftext|>")
  with pytest.raises(ValueError, match="knows neither"):
    ChatRenderer(load_tokenizer(bare))
  with pytest.raises(ValueError, match="has no chat template"):
    ChatRenderer(toks["qwen_plain"], "tokenizer")
  with pytest.raises(ValueError, match="'<\\|im_start\\|>' as a single token"):
    ChatRenderer(toks["llama_plain"], "chatml")
  with pytest.raises(ValueError, match="must be one of"):
    ChatRenderer(toks["qwen"], "alpaca")


@pytest.mark.parametrize("name,warns", [("qwen", True), ("qwen_instruct", False),
                                        ("llama31", False), ("llama31_base", True)])
def test_eos_differs_from_turn_end_warning(toks, caplog, name, warns):
  with caplog.at_level(logging.WARNING):
    renderer = ChatRenderer(toks[name], template_kwargs=DATE)
  assert renderer.turn_end_id == toks[name].token_to_id(renderer.turn_end)
  warnings = [r for r in caplog.records if "ends assistant turns with" in r.getMessage()]
  assert len(warnings) == int(warns)
  if warns:
    assert toks[name].special_tokens["eos_token"] in warnings[0].getMessage()
    assert renderer.turn_end in warnings[0].getMessage()
    renderer.render(SINGLE)  # warned at construction, not per example
    assert len([r for r in caplog.records if "ends assistant turns" in r.getMessage()]) == 1


# -- Bad conversations ------------------------------------------------------------------------

def test_no_scored_tokens(toks):
  renderer = ChatRenderer(toks["qwen"])
  with pytest.raises(NoScoredTokensError) as info:
    renderer.render([msg("system", SYSTEM), msg("user", QUESTION)])
  assert isinstance(info.value, FormatError)


@pytest.mark.parametrize("conversation,error,reason", [
    ([msg("user", "q"), msg("assistant", "4<|im_end|>more")], TemplateError, "turn-end token"),
    ([msg("user", "q"), msg("assistant", " \n")], FormatError, "empty assistant turn"),
    ([msg("user", "q"), {"role": "assistant", "content": None}], FormatError, "not a"),
])
def test_bad_conversations(toks, conversation, error, reason):
  with pytest.raises(error, match=reason):
    ChatRenderer(toks["qwen"]).render(conversation)


# -- SentencePiece ----------------------------------------------------------------------------

def test_sentencepiece_with_builtin_chatml(toks, caplog):
  tok = toks["sp"]
  assert isinstance(tok, chat.SentencePieceTokenizer) and tok.chat_template is None
  assert tok.token_to_id("<|im_end|>") is not None and tok.token_to_id("<|im_x|>") is None
  with caplog.at_level(logging.WARNING):
    renderer = ChatRenderer(tok)
  assert "does not round-trip" not in caplog.text
  assert "ends assistant turns with '<|im_end|>'" in caplog.text  # SentencePiece eos is </s>
  for conversation in (SINGLE, MULTI):
    example = renderer.render(conversation)
    expected = [m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant"]
    assert scored_texts(tok, example) == expected
    assert tok.decode(example.tokens) == renderer.render_text(conversation)
    first = next(k for k, m in enumerate(conversation) if m["role"] == "assistant")
    np.testing.assert_array_equal(example.tokens[:example.prompt_len],
                                  renderer.encode_prompt(conversation[:first]))


def test_sentencepiece_that_loses_newlines_warns(toks, caplog):
  with caplog.at_level(logging.WARNING):
    ChatRenderer(toks["sp_default"], "chatml")
  assert "does not round-trip" in caplog.text


# -- Data-loader workers ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen", "sp"])
def test_renderer_pickles(toks, name):
  renderer = ChatRenderer(toks[name])
  clone = pickle.loads(pickle.dumps(renderer))
  a, b = renderer.render(MULTI), clone.render(MULTI)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.loss_mask, b.loss_mask)


# -- Formats through the renderer -------------------------------------------------------------

def test_sharegpt_and_openr1_records_end_to_end(toks):
  tok = toks["qwen"]
  renderer = ChatRenderer(tok)
  stratos = ("<|begin_of_thought|>\n\nThe problem asks for the area of the triangle.\n\n"
             "<|end_of_thought|>\n\n<|begin_of_solution|>\n\nThe area is $12$.\n\n"
             "<|end_of_solution|>")
  record = {"system": "Your role as an assistant involves thoroughly exploring questions.",
            "conversations": [{"from": "user", "value": "Find the area."},
                              {"from": "assistant", "value": stratos}]}
  [conversation] = to_conversations(record)
  example = renderer.render(conversation)
  assert scored_texts(tok, example) == [stratos + "<|im_end|>"]
  # The Sky-T1 delimiters are text to this tokenizer, not control tokens.
  assert tok.token_to_id("<|begin_of_thought|>") is None
  openr1 = {"problem": "Compute $1 + 2$.", "generations": ["<think>\n3\n</think>\n\n$3$",
                                                          "<think>\n4\n</think>\n\n$4$"],
            "correctness_math_verify": [False, True]}
  examples = [renderer.render(c) for c in to_conversations(openr1)]
  assert [scored_texts(tok, e) for e in examples] == [["<think>\n4\n</think>\n\n$4$<|im_end|>"]]
