"""The trace-reading flags that tools share, the same settings as a run's `data.*` keys.

  --fields=question=query,attempt=final --thinking_open=... --thinking_close=...
  --system_prompt=... --s1k_variant=auto

`spec()` turns them into a `formats.FormatSpec` through `formats.parse_spec`, the parser that
reads the config keys, so a tool and a run given the same settings read records alike.
"""

from absl import flags

from jaxdistill.data import formats

_DEFAULT = formats.DEFAULT_SPEC


def define() -> None:
  """Defines --fields, --thinking_open, --thinking_close, --system_prompt, --s1k_variant."""
  flags.DEFINE_string("fields", "", "Renamed fields as canonical=theirs,... (data.fields), e.g. "
                      "question=query,thinking_trajectories=reasoning,attempt=final or "
                      "messages=dialog,role=speaker,content=text.")
  flags.DEFINE_string("thinking_open", _DEFAULT.thinking_open,
                      "s1k: text before the thinking in the assistant turn (data.thinking_open).")
  flags.DEFINE_string("thinking_close", _DEFAULT.thinking_close,
                      "s1k: text between the thinking and the answer (data.thinking_close).")
  flags.DEFINE_string("system_prompt", "", "System message for conversations without one "
                      "(data.system_prompt; '' = none).")
  flags.DEFINE_string("s1k_variant", _DEFAULT.s1k_variant, "s1k thinking/answer pair: "
                      f"{', '.join(formats.S1K_VARIANTS)} (data.s1k_variant).")


def spec() -> formats.FormatSpec:
  """The FormatSpec of the parsed flags; ValueError names the flags that are wrong."""
  f = flags.FLAGS
  return formats.parse_spec(f.fields, f.thinking_open, f.thinking_close, f.system_prompt,
                            f.s1k_variant, prefix="--")
