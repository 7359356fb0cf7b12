"""Chat-template rendering and the assistant-only loss mask.

The tokenizers are tokenizer.py's (`load_tokenizer`, also reachable here).
`ChatRenderer.render(messages)` returns the token ids of a conversation and a mask that is
True exactly on the tokens of the assistant turns' contents and on the token that ends each
of those turns (`<|im_end|>` for ChatML/Qwen, `<|eot_id|>` for Llama 3), the tokens the loss
is taken on.

How the mask is found. The template gives the text and the character position where each
scored turn starts: built-in templates (`chatml`, `llama3`) know them as they write the
text; a Jinja template (the tokenizer's own, or one passed in) is rendered for the whole
conversation and, for each assistant turn k, for `messages[:k]` with the generation prompt,
which must be a prefix of the whole text and ends where the turn starts. A turn runs from
its start through the next turn-end token. This needs no `{% generation %}` markers, which
the published Qwen2.5 and Llama 3 templates lack.

The ids come from tokenizing the whole text once. A turn's first token is where the
tokenization of its prompt (encoded on its own, a short text in single-turn traces) ends,
checked token for token, because byte-level BPE can merge across the boundary
(ChatML's header ends in "\\n", so content starting with "\\n" makes one "\\n\\n" token that
straddles it). On such a merge the text is re-tokenized in pieces split at the turn starts,
so the prompt part is exactly what a sampler feeds for that prompt and the mask covers the
content exactly. Character offsets were the other option; they must either score header
bytes or leave content bytes unscored, and the prompt tokens would still differ from the
sampler's.

Templates that rewrite assistant turns. QwQ's and Qwen3's templates drop the `<think>`
section of earlier assistant turns; DeepSeek-R1 distills' drop it from every turn. An
earlier turn whose rendered text is not its content (up to surrounding whitespace, which
Llama 3 trims) is left unscored, since its rewritten form is not what the model should learn
to write. The last assistant turn, the one long-CoT traces are about, must come out whole or
`render` raises `TemplateError`.

The mask marks targets: `loss_mask[i]` says token i is to be predicted (from tokens < i).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import numpy as np

from jaxdistill.data import tokenizer as tokenizer_lib
from jaxdistill.data.formats import FormatError
from jaxdistill.data.tokenizer import Tokenizer

# Tokens that can end an assistant turn in the chat templates of the supported families.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>")
TEMPLATES = ("auto", "tokenizer", "chatml", "llama3")
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Rendered once at construction, to find the turn-end token and check round trips.
_PROBE = ({"role": "user", "content": "What is 2 + 2?"},
          {"role": "assistant", "content": "2 + 2 = 4."})


class NoScoredTokensError(FormatError):
  """A rendered example with no token to train on (no assistant turn survived rendering)."""


class TemplateError(FormatError):
  """A conversation this template/tokenizer pair cannot render with a trustworthy mask."""


# The tokenizers (tokenizer.py), where callers have always found them.
load_tokenizer = tokenizer_lib.load_tokenizer
tokenizer_sha256 = tokenizer_lib.tokenizer_sha256
HFTokenizer = tokenizer_lib.HFTokenizer
SentencePieceTokenizer = tokenizer_lib.SentencePieceTokenizer


# -- Jinja ------------------------------------------------------------------------------------

class _GenerationTag(jinja2.ext.Extension):
  """Accepts transformers' `{% generation %}` markers as no-ops (prefix renders find turns)."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # Jinja's own tojson escapes HTML characters, which chat templates do not expect.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
  """Compiles a chat template in the environment transformers renders them in.

  Same sandbox, block trimming, loop controls, `tojson`, `raise_exception` and
  `strftime_now`, so the text equals `apply_chat_template(..., tokenize=False)` (tested).
  """
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[jinja2.ext.loopcontrols, _GenerationTag])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env.from_string(source)


# -- Rendering --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RenderedExample:
  """One conversation as tokens.

  Attributes:
    tokens: int32 [n] token ids of the whole rendered conversation.
    loss_mask: bool [n], True on assistant-content tokens and their turn-end tokens.
    prompt_len: index of the first scored token, i.e. the length of the first prompt.
  """
  tokens: np.ndarray
  loss_mask: np.ndarray
  prompt_len: int

  @property
  def num_scored(self) -> int:
    return int(self.loss_mask.sum())


class ChatRenderer:
  """Renders conversations to tokens with an assistant-only loss mask.

  Args:
    tokenizer: from `load_tokenizer`.
    template: "auto" (the tokenizer's own template when it has one, else ChatML when it
      knows `<|im_start|>`, else Llama 3 when it knows `<|start_header_id|>`),
      "tokenizer", "chatml" (Qwen's turn format, no default system prompt), "llama3" (the
      Llama 3 format: BOS, headers, trimmed contents, no default system prompt), or the
      source of a Jinja chat template.
    turn_end: the token that ends an assistant turn; found from the template when None.
    score: "all" assistant turns, or only the "last" one.
    boundary: what to do when BPE merges across a prompt/answer boundary: "split" (re-
      tokenize split at the turn starts, see the module docstring) or "error".
    template_kwargs: extra variables for Jinja templates, e.g. `{"date_string": "26 Jul
      2024"}` so Llama 3.2's template does not write today's date into every example.

  Attributes:
    template_name: "tokenizer", "chatml", "llama3" or "jinja" (a template passed in).
    turn_end, turn_end_id: the turn-end token the mask ends each turn on; samplers and
      exporters should stop on `turn_end_id` (it differs from the tokenizer's eos in base
      models, e.g. Qwen2.5 base ends with `<|endoftext|>`).
    counts: how often the fallbacks fired ("split_boundary", "unscored_rewritten_turn").
  """

  def __init__(self, tokenizer: Tokenizer, template: str = "auto", *,
               turn_end: str | None = None, score: str = "all", boundary: str = "split",
               template_kwargs: Mapping[str, Any] | None = None):
    if score not in ("all", "last"):
      raise ValueError(f"score must be 'all' or 'last', got {score!r}")
    if boundary not in ("split", "error"):
      raise ValueError(f"boundary must be 'split' or 'error', got {boundary!r}")
    self.tokenizer = tokenizer
    self.score = score
    self.boundary = boundary
    self.counts = collections.Counter()
    self._template_vars = {**tokenizer.special_tokens, **(template_kwargs or {})}
    self.template_name, self._source = _resolve_template(tokenizer, template)
    self._jinja = compile_template(self._source) if self._source is not None else None
    if self.template_name == "chatml":
      _require_tokens(tokenizer, _CHATML_TOKENS, "ChatML")
    elif self.template_name == "llama3":
      _require_tokens(tokenizer, _LLAMA3_TOKENS, "Llama 3")
    # Tokenizers that put a space before every text they encode (SentencePiece's dummy
    # prefix, byte-level with add_prefix_space) would add one to each piece of a split.
    first = tokenizer.id_to_token(tokenizer.encode("a")[0]) or ""
    self._prepends_space = first.startswith(("\u2581", "\u0120"))
    self.turn_end = turn_end or self._find_turn_end()
    self.turn_end_id = _require_tokens(tokenizer, (self.turn_end,), "turn-end")[0]
    if tokenizer.eos_id != self.turn_end_id:
      eos = tokenizer.special_tokens.get("eos_token")
      logging.warning(
          "Tokenizer %s: eos is %r (id %s) but the %s template ends assistant turns with %r "
          "(id %d). Training targets %r, so the model learns to stop there: stop sampling on "
          "ChatRenderer.turn_end_id and export it among the eos ids.", tokenizer.path, eos,
          tokenizer.eos_id, self.template_name, self.turn_end, self.turn_end_id,
          self.turn_end)
    probe = self.render_text(_PROBE)
    if tokenizer.decode(tokenizer.encode(probe)) != probe:
      logging.warning(
          "Tokenizer %s does not round-trip the %s template's text (e.g. a SentencePiece "
          "model that normalises newlines or adds a leading space): the model will be "
          "trained on text other than what the template writes. %r -> %r", tokenizer.path,
          self.template_name, probe, tokenizer.decode(tokenizer.encode(probe)))

  # Compiled Jinja templates do not pickle; data-loader worker processes recompile theirs.
  def __getstate__(self):
    return {**self.__dict__, "_jinja": None}

  def __setstate__(self, state):
    self.__dict__.update(state)
    if self._source is not None:
      self._jinja = compile_template(self._source)

  def identity(self) -> dict[str, Any]:
    """What decides the tokens and masks this renderer makes, as JSON, so that data tokenised
    earlier (`prepare.py` writes this into stats.json) can be checked against a run's renderer.

    Returns {"path" (where the tokenizer was loaded from; informative, a copy elsewhere is the
    same tokenizer), "vocab_size", "tokenizer_sha256" (every id's token string and the ids of
    a fixed text: a changed vocabulary, merges or normalisation changes it, a moved or
    re-saved file does not), "template", "template_sha256" (the template's source or
    built-in name, its variables, turn end and scoring rules), "turn_end", "turn_end_id"}.
    """
    tok = self.tokenizer
    template = json.dumps([self.template_name, self._source, self._template_vars, self.turn_end,
                           self.score, self.boundary], sort_keys=True, default=str)
    return {"path": os.path.abspath(tok.path), "vocab_size": tok.vocab_size,
            "tokenizer_sha256": tokenizer_sha256(tok), "template": self.template_name,
            "template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "turn_end": self.turn_end, "turn_end_id": self.turn_end_id}

  # -- Text -----------------------------------------------------------------------------------

  def render_text(self, messages: Sequence[Mapping[str, Any]],
                  add_generation_prompt: bool = False) -> str:
    """The conversation as text; with the generation prompt, what a sampler continues."""
    if self._jinja is not None:
      return self._render_jinja(messages, add_generation_prompt)
    return self._builtin_layout(messages, add_generation_prompt)[0]

  def encode_prompt(self, messages: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """int32 [n] ids of `messages` plus the assistant header: a sampler's prompt."""
    return np.asarray(self.tokenizer.encode(self.render_text(messages, True)), np.int32)

  def _render_jinja(self, messages, add_generation_prompt: bool) -> str:
    try:
      return self._jinja.render(messages=list(messages), tools=None, documents=None,
                                add_generation_prompt=add_generation_prompt,
                                **self._template_vars)
    except jinja2.exceptions.TemplateError as e:
      raise TemplateError(f"chat template failed: {e}") from e

  def _builtin_layout(self, messages, add_generation_prompt: bool = False):
    """Text of a built-in template and where each assistant turn's content starts in it."""
    parts, starts, pos = [], [], 0
    llama3 = self.template_name == "llama3"
    if llama3:
      parts.append("<|begin_of_text|>")
      pos = len(parts[0])
    for message in messages:
      role, content = message["role"], message["content"]
      if llama3:
        header = f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        content, end, tail = content.strip(), "<|eot_id|>", ""
      else:
        header = f"<|im_start|>{role}\n"
        end, tail = "<|im_end|>", "\n"
      if role == "assistant":
        starts.append(pos + len(header))
      parts += (header, content, end, tail)
      pos += len(header) + len(content) + len(end) + len(tail)
    if add_generation_prompt:
      parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n" if llama3
                   else "<|im_start|>assistant\n")
    return "".join(parts), starts

  def _jinja_layout(self, messages):
    """Text of the Jinja template and where each assistant turn to score starts in it."""
    text = self._render_jinja(messages, False)
    assistant = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if self.score == "last":
      assistant = assistant[-1:]
    starts = []
    for k in assistant:
      prompt = self._render_jinja(messages[:k], True)
      if not text.startswith(prompt):
        raise TemplateError(
            f"assistant turn {k}: the template renders the conversation before it "
            "differently with and without the generation prompt, so the turn cannot be "
            "located; use template='chatml' or 'llama3'")
      start = len(prompt)
      end = text.find(self.turn_end, start)
      if end < 0:
        raise TemplateError(f"assistant turn {k}: the template wrote no {self.turn_end!r} "
                            "after it")
      body, content = text[start:end], messages[k]["content"]
      if body != content and body != content.strip():
        if k == assistant[-1]:
          raise TemplateError(
              "the template rewrites the last assistant turn (its rendered text is not its "
              "content, e.g. the <think> section was dropped); train with template='chatml' "
              "or 'llama3', or a template that keeps it")
        if not self.counts["unscored_rewritten_turn"]:
          logging.warning("The chat template rewrites earlier assistant turns (e.g. drops "
                          "their <think> section); those turns are left unscored.")
        self.counts["unscored_rewritten_turn"] += 1
        continue
      starts.append(start)
    return text, starts

  # -- Tokens ---------------------------------------------------------------------------------

  def render(self, messages: Sequence[Mapping[str, Any]]) -> RenderedExample:
    """Token ids and the loss mask of one conversation.

    Args:
      messages: `{"role", "content"}` dicts, as `formats.to_conversations` returns them.

    Returns:
      A `RenderedExample`; see the module docstring for what the mask covers.

    Raises:
      FormatError: a malformed message or an empty assistant turn.
      TemplateError: the turn-end token inside a message, or a template that hides turns.
      NoScoredTokensError: no assistant turn to train on.
    """
    for i, message in enumerate(messages):
      if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or (
          not isinstance(message.get("content"), str)):
        raise FormatError(f"turn {i} is not a {{'role': str, 'content': str}} message")
      if self.turn_end in message["content"]:
        raise TemplateError(f"turn {i} contains the turn-end token {self.turn_end!r}")
      if message["role"] == "assistant" and not message["content"].strip():
        raise FormatError(f"empty assistant turn (turn {i})")
    if self._jinja is not None:
      text, char_starts = self._jinja_layout(messages)
    else:
      text, char_starts = self._builtin_layout(messages)
    if self.score == "last":
      char_starts = char_starts[-1:]
    if not char_starts:
      raise NoScoredTokensError("no assistant turn to score")
    ids, starts = self._tokenize(text, char_starts)
    tokens = np.asarray(ids, np.int32)
    # Each scored turn runs from its first token through the next turn-end token; the
    # content cannot hold that token (checked above), so the first one found is the turn's.
    ends = np.flatnonzero(tokens == self.turn_end_id)
    loss_mask = np.zeros(len(tokens), np.bool_)
    for start in starts:
      i = np.searchsorted(ends, start)
      if i == len(ends):
        raise TemplateError(f"no {self.turn_end!r} token after a scored turn")
      loss_mask[start:ends[i] + 1] = True
    return RenderedExample(tokens, loss_mask, prompt_len=starts[0])

  def _tokenize(self, text: str, cuts: list[int]) -> tuple[list[int], list[int]]:
    """Ids of `text` and the token index at which each char position in `cuts` starts."""
    encode = self.tokenizer.encode
    ids = encode(text)
    starts = []
    for cut in cuts:
      prompt = encode(text[:cut])
      if ids[:len(prompt)] != prompt:
        break
      starts.append(len(prompt))
    else:
      return ids, starts
    if self.boundary == "error" or self._prepends_space:
      raise TemplateError(f"the tokens of the prompt ending at character {cut} are not a "
                          "prefix of the conversation's tokens (a BPE merge crosses the "
                          "boundary)" + (", and this tokenizer prepends a space to every "
                                         "text, so it cannot be split there"
                                         if self._prepends_space else ""))
    if not self.counts["split_boundary"]:
      logging.warning("A BPE merge crosses a prompt/answer boundary (content starting with "
                      "whitespace?); tokenizing such examples split at the turn starts.")
    self.counts["split_boundary"] += 1
    ids, starts = [], []
    for begin, end in zip([0] + cuts, cuts + [len(text)]):
      if begin:
        starts.append(len(ids))
      ids += encode(text[begin:end])
    return ids, starts

  def _find_turn_end(self) -> str:
    """The first known turn-end token the template writes after an assistant turn."""
    text = self.render_text(_PROBE)
    after = text.rfind(_PROBE[-1]["content"]) + len(_PROBE[-1]["content"])
    candidates = list(TURN_END_TOKENS)
    if self.tokenizer.special_tokens.get("eos_token"):
      candidates.append(self.tokenizer.special_tokens["eos_token"])
    found = [(text.find(t, after), t) for t in candidates if text.find(t, after) >= 0]
    if not found:
      raise ValueError(f"cannot tell which token ends an assistant turn in the "
                       f"{self.template_name} template (it rendered {text!r}); pass turn_end")
    return min(found)[1]


def _resolve_template(tokenizer: Tokenizer, template: str) -> tuple[str, str | None]:
  """(template_name, Jinja source or None for a built-in)."""
  if template == "auto":
    if tokenizer.chat_template:
      return "tokenizer", tokenizer.chat_template
    if tokenizer.token_to_id("<|im_start|>") is not None:
      return "chatml", None
    if tokenizer.token_to_id("<|start_header_id|>") is not None:
      return "llama3", None
    raise ValueError(f"tokenizer {tokenizer.path} has no chat template and knows neither "
                     "<|im_start|> (ChatML) nor <|start_header_id|> (Llama 3); pass "
                     "template='chatml' or 'llama3' after adding those tokens, or a Jinja "
                     "template")
  if template == "tokenizer":
    if not tokenizer.chat_template:
      raise ValueError(f"tokenizer {tokenizer.path} has no chat template; pass "
                       "template='chatml' or 'llama3'")
    return "tokenizer", tokenizer.chat_template
  if template in ("chatml", "llama3"):
    return template, None
  if "{{" in template or "{%" in template:
    return "jinja", template
  raise ValueError(f"template must be one of {TEMPLATES} or a Jinja template, got "
                   f"{template!r}")


def _require_tokens(tokenizer: Tokenizer, tokens: Sequence[str], what: str) -> list[int]:
  """Ids of `tokens`, each of which must be encoded as that one id wherever it appears."""
  ids = []
  # After some text, so that a SentencePiece dummy-prefix space lands on the text.
  before = tokenizer.encode("a")
  for token in tokens:
    token_id = tokenizer.token_to_id(token)
    if token_id is None or tokenizer.encode("a" + token) != before + [token_id]:
      raise ValueError(f"tokenizer {tokenizer.path} does not encode the {what} token "
                       f"{token!r} as a single token (it gives {tokenizer.encode(token)})")
    ids.append(token_id)
  return ids
