"""Offline tokenizers and chat templates for data tests: Qwen2.5- and Llama 3-like, SentencePiece.

The tokenizers are tiny byte-level BPEs trained in a fraction of a second on `CORPUS`, with
the real pre-tokenizer regexes and the real special tokens of each family, saved as Hugging
Face tokenizer directories. The chat templates are the published ones, written out verbatim:
Qwen2.5-Instruct's (default system prompt, tool-call branches) and Llama 3.1-Instruct's
("Cutting Knowledge Date" / "Today Date" system header), plus the shorter Llama 3 (3.0) one.

Typical use (other data tests may import these):

  qwen_dir = data_fixtures.save_qwen25_tokenizer(tmp_path / "qwen")           # base: eos
  instruct = data_fixtures.save_qwen25_tokenizer(tmp_path / "qi", instruct=True)
  llama_dir = data_fixtures.save_llama3_tokenizer(tmp_path / "llama")         # 3.1 template
  sp_model = data_fixtures.save_sentencepiece_model(tmp_path / "sp.model")   # ChatML specials
"""

from __future__ import annotations

import io
import os

# Enough text for a few hundred merges: reasoning-trace prose with paragraph breaks, LaTeX,
# digits, the role names, the thinking tags and some non-ASCII (multi-byte) characters.
CORPUS = [
    "system user assistant system user assistant",
    "Let me think step by step.\n\nFirst, we compute the sum of the digits.\n\nThe answer is 42.",
    "<think>\nOkay, so I need to find the number of integers n such that n^2 < 100.\n</think>\n\n"
    "The answer is \\boxed{19}.",
    "We have $x + y = 10$ and $xy = 21$, so $x$ and $y$ are the roots of $t^2 - 10t + 21 = 0$."
    "\n\nTherefore $x = 3$ or $x = 7$.",
    "Wait, that is not right. Let me check again: 3 * 7 = 21 and 3 + 7 = 10. Yes.\n\n",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "You are a helpful assistant. You are Qwen, created by Alibaba Cloud.",
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    "<|begin_of_thought|>\n\nThe problem asks for the area of the triangle.\n\n"
    "<|end_of_thought|>\n\n<|begin_of_solution|>\n\nThe area is $\\frac{1}{2}bh = 12$."
    "\n\n<|end_of_solution|>",
    "Café, naïve, π ≈ 3.14159, √2, ∑ and ≤ appear in some traces; so do emoji 🙂 and 数学.",
    "Hmm.\n\n\nSo the final answer is 5.\n\nAnswer: 5",
] * 8

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN25_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                         "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen/Qwen2.5-*-Instruct tokenizer_config.json "chat_template", verbatim.
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json "chat_template", verbatim. (The first
# 3.1 upload lacks the `tools = none` default; transformers always passes `tools`, so both
# revisions render the same.)
LLAMA31_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# meta-llama/Meta-Llama-3-8B-Instruct (3.0) "chat_template", verbatim (its string literals
# hold real newlines).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")

# Not published templates: ChatML templates that drop the <think> section of assistant
# turns the way QwQ's does for earlier turns and DeepSeek-R1-Distill's does for all of them.
CHATML_STRIP_EARLIER_THINKING = r"""{%- for message in messages %}
    {%- set content = message.content %}
    {%- if message.role == 'assistant' and not loop.last %}
        {%- set content = content.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
CHATML_STRIP_ALL_THINKING = CHATML_STRIP_EARLIER_THINKING.replace(" and not loop.last", "")


def train_bpe(pattern: str, special_tokens, vocab_size: int = 800, nfc: bool = False):
  """A byte-level BPE `tokenizers.Tokenizer` trained on `CORPUS` (deterministic)."""
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                          processors, trainers)
  tok = Tokenizer(models.BPE())
  if nfc:
    tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  return tok


def save_hf_tokenizer(tok, directory, template: str | None, **special) -> str:
  """Saves a `tokenizers.Tokenizer` as a Hugging Face directory (special tokens as kwargs)."""
  import transformers  # pylint: disable=g-import-not-at-top
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
  if template is not None:
    fast.chat_template = template
  os.makedirs(directory, exist_ok=True)
  fast.save_pretrained(directory)
  return str(directory)


def save_qwen25_tokenizer(directory, *, instruct: bool = False,
                          template: str | None = QWEN25_CHAT_TEMPLATE,
                          truncate_at: int | None = None) -> str:
  """A Qwen2.5-like tokenizer directory.

  Args:
    directory: where to save it.
    instruct: eos `<|im_end|>` as in Qwen2.5-*-Instruct; else `<|endoftext|>`, as in the
      base models (the eos/turn-end trap).
    template: chat template to store (None stores none).
    truncate_at: save tokenizer.json with truncation at this many tokens switched on.
  """
  tok = train_bpe(QWEN2_PATTERN, QWEN25_SPECIAL_TOKENS, nfc=True)
  if truncate_at is not None:
    tok.enable_truncation(truncate_at)
  return save_hf_tokenizer(tok, directory, template,
                           eos_token="<|im_end|>" if instruct else "<|endoftext|>",
                           pad_token="<|endoftext|>",
                           additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def save_llama3_tokenizer(directory, *, instruct: bool = True,
                          template: str | None = LLAMA31_CHAT_TEMPLATE) -> str:
  """A Llama 3-like tokenizer directory whose post-processor adds BOS, as the real one does.

  `instruct` sets eos `<|eot_id|>` (Llama 3.1 Instruct); else `<|end_of_text|>` (base).
  """
  from tokenizers import processors  # pylint: disable=g-import-not-at-top
  tok = train_bpe(LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS)
  bos = tok.token_to_id("<|begin_of_text|>")
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                    pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                    special_tokens=[("<|begin_of_text|>", bos)])])
  return save_hf_tokenizer(tok, directory, template, bos_token="<|begin_of_text|>",
                           eos_token="<|eot_id|>" if instruct else "<|end_of_text|>",
                           additional_special_tokens=list(LLAMA3_SPECIAL_TOKENS[1:]))


def save_sentencepiece_model(path, *, chatml_ready: bool = True) -> str:
  """A tiny SentencePiece BPE model with the ChatML tokens as user-defined symbols.

  `chatml_ready` trains it the way a ChatML SentencePiece model must be: identity
  normalisation, whitespace kept and no dummy-prefix space, so newlines survive. Without
  it, SentencePiece's defaults turn newlines into spaces.
  """
  import sentencepiece  # pylint: disable=g-import-not-at-top
  options = dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                 add_dummy_prefix=False) if chatml_ready else {}
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400, model_type="bpe",
      user_defined_symbols=list(QWEN25_SPECIAL_TOKENS), byte_fallback=True,
      character_coverage=1.0, minloglevel=2, **options)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return str(path)
