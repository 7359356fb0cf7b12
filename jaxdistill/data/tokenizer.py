"""Tokenizers: a Hugging Face tokenizer directory (through its Rust `tokenizers` backend, so
encoding costs one call into Rust) or a SentencePiece `.model` file, behind the one
interface the data pipeline, the sampler and evaluation use (`load_tokenizer`); chat.py
renders conversations with them.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from collections.abc import Mapping, Sequence

from jaxdistill import storage

# Encoded into `tokenizer_sha256` (and so `ChatRenderer.identity`): digits, LaTeX, whitespace runs and non-ASCII text, where
# tokenizers with one vocabulary but other merges or normalisers differ.
_IDENTITY_TEXT = ("<think>\nLet x = 12345; then 2x^2 - 3x + 7 = 0, so \\frac{3}{4}.\n\n  Done."
                  "</think>\n\n\\boxed{042} Größe, 数学, naïve café 🙂\t\r\n")


class Tokenizer(abc.ABC):
  """What the data pipeline needs from a tokenizer; build one with `load_tokenizer`.

  Attributes:
    path: where it was loaded from.
    vocab_size: number of ids the tokenizer can produce, added tokens included (a model's
      embedding table may be larger, e.g. Qwen2.5 pads it to 151,936).
    eos_id, pad_id, bos_id: ids of the tokenizer's own special tokens, or None.
    special_tokens: `bos_token`, `eos_token`, `pad_token`, `unk_token` strings (those that
      are set), the variables Jinja chat templates read.
    chat_template: the tokenizer's Jinja chat template, or None.
  """
  path: str
  vocab_size: int
  eos_id: int | None
  pad_id: int | None
  bos_id: int | None
  special_tokens: dict[str, str]
  chat_template: str | None

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, special-token strings included; never adds BOS/EOS itself."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`, special tokens written out."""

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int | None:
    """The id of the single token `token`, or None when the vocabulary lacks it."""

  @abc.abstractmethod
  def id_to_token(self, token_id: int) -> str | None:
    """The token string of `token_id`, or None when out of range."""

  def __repr__(self):
    return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


# Tokenizer classes whose tokenizer.json transformers uses as written: such a directory is read
# with `tokenizers` alone, without importing transformers (and the PyTorch it imports, ~3.5 s
# of a tool's start). Other classes (e.g. LlamaTokenizerFast, which may rebuild the
# normaliser) go through transformers.
_VERBATIM_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


class HFTokenizer(Tokenizer):
  """A Hugging Face tokenizer directory, encoded through its Rust backend."""

  def __init__(self, directory: str):
    read = _read_verbatim(directory)
    if read is None:
      backend, special, template = _read_with_transformers(directory)
    else:
      backend, special, template = read
    # A tokenizer.json saved with truncation or padding on would cut or pad every trace
    # silently; over-length examples are the packer's business.
    backend.no_truncation()
    backend.no_padding()
    self._tok = backend
    self.path = directory
    self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
    self.special_tokens = special
    self.eos_id, self.pad_id, self.bos_id = (
        None if special.get(name) is None else backend.token_to_id(special[name])
        for name in ("eos_token", "pad_token", "bos_token"))
    if isinstance(template, Mapping):  # several named templates; "default" is the chat one
      template = template.get("default")
    self.chat_template = template or None

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self._tok.id_to_token(int(token_id))


def _read_verbatim(directory: str):
  """(backend, special tokens, chat template) read from the files of a directory whose
  tokenizer class takes tokenizer.json as written (`_VERBATIM_CLASSES`), else None."""
  def read_json(name):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      return {}
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  config = read_json("tokenizer_config.json")
  if (config.get("tokenizer_class") not in _VERBATIM_CLASSES
      or not os.path.isfile(os.path.join(directory, "tokenizer.json"))):
    return None
  from tokenizers import Tokenizer as Backend  # pylint: disable=g-import-not-at-top
  backend = Backend.from_file(os.path.join(directory, "tokenizer.json"))
  special = {}
  for source in (read_json("special_tokens_map.json"), config):  # the config wins
    for name in _SPECIAL_NAMES:
      value = source.get(name)
      if isinstance(value, Mapping):  # a serialised AddedToken
        value = value.get("content")
      if value is not None:
        special[name] = value
  template = config.get("chat_template") or read_json("chat_template.json").get("chat_template")
  jinja_file = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja_file):  # what transformers saves, and prefers when both exist
    with open(jinja_file, encoding="utf-8") as f:
      template = f.read()
  if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
    template = {t["name"]: t["template"] for t in template}
  return backend, special, template


def _read_with_transformers(directory: str):
  """(backend, special tokens, chat template) as transformers' AutoTokenizer loads them."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  hf = AutoTokenizer.from_pretrained(directory)
  backend = getattr(hf, "backend_tokenizer", None)
  if backend is None:
    raise ValueError(f"{directory} has no fast tokenizer (tokenizer.json) and transformers "
                     "could not convert it; pass the SentencePiece .model file instead")
  special = {name: getattr(hf, name) for name in _SPECIAL_NAMES
             if getattr(hf, name) is not None}
  return backend, special, hf.chat_template


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file (no chat template; use a built-in one)."""

  def __init__(self, model_file: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    self.path = model_file
    self.vocab_size = self._sp.get_piece_size()
    ids = {"bos_token": self._sp.bos_id(), "eos_token": self._sp.eos_id(),
           "pad_token": self._sp.pad_id(), "unk_token": self._sp.unk_id()}
    ids = {name: i for name, i in ids.items() if i >= 0}  # -1 means "not defined"
    self.special_tokens = {name: self._sp.id_to_piece(i) for name, i in ids.items()}
    self.eos_id, self.pad_id = ids.get("eos_token"), ids.get("pad_token")
    self.bos_id = ids.get("bos_token")
    self.chat_template = None

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def token_to_id(self, token: str) -> int | None:
    # piece_to_id answers unk_id for unknown pieces.
    i = self._sp.piece_to_id(token)
    return i if self._sp.id_to_piece(i) == token else None

  def id_to_token(self, token_id: int) -> str | None:
    return self._sp.id_to_piece(int(token_id)) if 0 <= token_id < self.vocab_size else None


def tokenizer_sha256(tok: Tokenizer) -> str:
  """Every id's token string and the ids of a fixed text, hashed: a changed vocabulary,
  merges or normalisation changes it, a moved or re-saved file does not."""
  vocab = hashlib.sha256()
  for i in range(tok.vocab_size):
    vocab.update(f"{tok.id_to_token(i)}\x00".encode("utf-8", "surrogatepass"))
  vocab.update(json.dumps(tok.encode(_IDENTITY_TEXT)).encode())
  return vocab.hexdigest()


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """A Hugging Face tokenizer directory or a SentencePiece `.model` file; a gs:// one is read
  from a local copy (`storage`; of a directory, every file but the weights)."""
  path = os.fspath(path)
  if storage.is_url(path):
    path = (storage.local_copy(path) if path.endswith(".model")
            else storage.local_dir(path, skip=storage.WEIGHT_SUFFIXES))
  if os.path.isdir(path):
    return HFTokenizer(path)
  if os.path.isfile(path) and path.endswith(".model"):
    return SentencePieceTokenizer(path)
  raise FileNotFoundError(f"{path} is neither a tokenizer directory nor a SentencePiece "
                          ".model file")
