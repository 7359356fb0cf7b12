"""Sampling rules: how the decode loop turns a step's logits into tokens, as small objects.

A rule is a hashable object (it is a static argument of the jitted decode) with two methods:
  init(rows) -> state: per-row state, every leaf [rows, ...]; () for a rule without any;
  rule(logits_BV, keys_B, state) -> (tokens_B [int32], state): one token per row, drawn with
    the row's own key.
The decode loop calls its rule without knowing which it is. It carries the state beside the
rows, resets a row's state when the row is refilled with a new prompt, and splits it over
devices with the rows, so a rule may keep whatever it needs per row (tokens generated so far,
whether a token was seen) and see the tokens it chose.

The usual rules are built from parts, each a frozen dataclass with one method:
  Greedy()          a rule: the first most likely id;
  Temperature(t)    logits -> logits / t;
  TopK(k), TopP(p)  logits -> logits with the ids outside the k likeliest, or outside the
                    nucleus of mass p, at -inf (the rule over the whole vocabulary);
and `chain(*parts)` makes one rule of them: the logit maps in order, then a draw from the
softmax (or Greedy's argmax). `rule_from(temperature, top_k, top_p)` builds the common case.
A chain never runs TopK/TopP as written: it fuses them into one cut found among the
likeliest candidate ids, the same law without sorting the vocabulary (`_cut_and_draw`).

A rule with state may wrap another (a `then` field): `BudgetForcing` keeps each row's
thinking between a least and a most number of tokens (s1, arXiv 2501.19393). Forcing text the
model did not choose needs two things of the loop, which any rule may use: the token a rule
returns is written whatever its logits said (so a rule emits forced tokens from a queue in its
state), and a rule with a `take_back(state) -> [R] int32` method may take back, per row, that
many of the row's last tokens before its token is written: the loop writes the step's token
over them, in the output and in the KV cache (sampler._decode). A rule without the method
costs the loop nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp


class Rule(Protocol):
  def init(self, rows: int) -> Any: ...
  def __call__(self, logits_BV: jax.Array, keys_B: jax.Array, state: Any
               ) -> tuple[jax.Array, Any]: ...


class _Stateless:
  def init(self, rows: int) -> tuple[()]:
    del rows
    return ()


@dataclasses.dataclass(frozen=True)
class Greedy(_Stateless):
  """The first argmax of each row (ties go to the lowest id, as `jnp.argmax`)."""

  def __call__(self, logits_BV, keys_B=None, state=()):
    del keys_B
    return _first_argmax(logits_BV), state


@dataclasses.dataclass(frozen=True)
class Temperature:
  t: float

  def __post_init__(self):
    if not self.t > 0:
      raise ValueError(f"Temperature({self.t}): t must be > 0; for the most likely token use "
                       "Greedy() (rule_from(temperature=0))")

  def __call__(self, logits_BV):
    return logits_BV / self.t


@dataclasses.dataclass(frozen=True)
class TopK:
  k: int

  def __post_init__(self):
    if self.k < 1:
      raise ValueError(f"TopK({self.k}): k must be >= 1; leave TopK out to keep every id")

  def __call__(self, logits_BV):
    """Ids below the k-th largest logit get -inf; ids tied with it stay."""
    k = min(self.k, logits_BV.shape[-1])
    kth = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV < kth, -jnp.inf, logits_BV)


@dataclasses.dataclass(frozen=True)
class TopP:
  p: float
  # How many likeliest ids a chain looks for the nucleus among before sorting the whole
  # vocabulary (without TopK; with it, the k + 1 likeliest always suffice).
  candidates: int = 256

  def __post_init__(self):
    if not 0 < self.p <= 1 or self.candidates < 1:
      raise ValueError(f"TopP({self.p}, candidates={self.candidates}): p must be in (0, 1] "
                       "and candidates >= 1")

  def __call__(self, logits_BV):
    """Keeps the fewest likeliest ids whose mass reaches p (ids tied with the last stay): an
    id stays while the mass before it is still below p."""
    if self.p >= 1.0:
      return logits_BV
    sorted_desc = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < self.p
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV < threshold, -jnp.inf, logits_BV)


@dataclasses.dataclass(frozen=True)
class Chain(_Stateless):
  """Logit maps in order, then a draw from the softmax, cut by an optional TopK then TopP
  (fused, see the module docstring); or, ending in Greedy, the argmax. Build with `chain`."""
  parts: tuple

  def __post_init__(self):
    kinds = [type(p).__name__ if isinstance(p, (Greedy, TopK, TopP)) else "map"
             for p in self.parts]
    where = f"chain({', '.join(map(repr, self.parts))})"
    cuts = [k for k in kinds if k in ("TopK", "TopP")]
    if "Greedy" in kinds[:-1]:
      raise ValueError(f"{where}: Greedy chooses the token, so it comes last")
    if cuts and kinds[-1] == "Greedy":
      raise ValueError(f"{where}: cuts do not change the argmax; drop TopK and TopP")
    if cuts and kinds[-len(cuts):] != cuts:
      raise ValueError(f"{where}: TopK and TopP come after every logit map (the nucleus is "
                       "cut from the distribution the maps make)")
    if cuts not in ([], ["TopK"], ["TopP"], ["TopK", "TopP"]):
      raise ValueError(f"{where}: at most one TopK, then at most one TopP")

  @property
  def greedy(self) -> bool:
    return bool(self.parts) and isinstance(self.parts[-1], Greedy)

  def __call__(self, logits_BV, keys_B, state=()):
    if self.greedy:
      for m in self.parts[:-1]:
        logits_BV = m(logits_BV)
      return _first_argmax(logits_BV), state
    logits = logits_BV.astype(jnp.float32)
    top_k, top_p = None, None
    for part in self.parts:
      if isinstance(part, TopK):
        top_k = part
      elif isinstance(part, TopP):
        top_p = part
      else:
        logits = part(logits)
    return _cut_and_draw(logits, keys_B, top_k, top_p), state


def chain(*parts) -> Chain:
  """One rule from logit maps (Temperature, or any hashable `logits_BV -> logits_BV`), then
  an optional TopK and TopP, then optionally Greedy; without Greedy the rule draws."""
  return Chain(tuple(parts))


def rule_from(temperature: float, top_k: int = 0, top_p: float = 1.0, *,
              candidates: int = 256) -> Rule:
  """The common rule: Greedy at temperature 0, else chain(Temperature, TopK, TopP) with the
  cuts left out where they keep every id (top_k 0, top_p 1); `candidates` is TopP's."""
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f"bad sampling settings: temperature={temperature} (>= 0), "
                     f"top_p={top_p} (in (0, 1]), top_k={top_k} (>= 0)")
  if temperature == 0:
    return Greedy()
  parts = [Temperature(temperature)]
  if top_k > 0:
    parts.append(TopK(top_k))
  if top_p < 1.0:
    parts.append(TopP(top_p, candidates))
  return chain(*parts)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForcingState:
  """BudgetForcing's per-row state (R rows)."""
  held: jax.Array  # [R] tokens the row holds (the loop's count: forced ones in, taken back out)
  tail: jax.Array  # [R, D - 1] its last D - 1 tokens (D: the delimiter's), -1 where unknown
  closed: jax.Array  # [R] bool: the thinking section has ended (or is being ended by force)
  waits: jax.Array  # [R] delimiters replaced so far
  source: jax.Array  # [R] the queue being emitted: 0 delimiter + cue, 1 "Wait"
  next: jax.Array  # [R] its next token's index
  stop: jax.Array  # [R] its length (next == stop: nothing queued)
  back: jax.Array  # [R] tokens this step took back (`take_back`)
  inner: Any  # the wrapped rule's state


@dataclasses.dataclass(frozen=True)
class BudgetForcing:
  """Budget forcing (s1, arXiv 2501.19393) around the rule `then`, all token ids.

  Thinking is counted from a row's first generated token (the templates here end the prompt
  at the assistant header; a model that opens its thinking with `<think>` spends that opener
  from the budget too; a template that writes `<think>` into the prompt makes the first
  generated token the first thinking token): thinking is every token before the first kept
  `think_end`. Each row on its own:
    maximum (max_thinking > 0): once a row holds max_thinking tokens without having closed
      its thinking, it may only go on spelling `think_end`; any other token is replaced by
      `think_end` (the part of it the row's last tokens do not already spell: no doubled
      half-delimiter), then `answer_cue`, and the model answers after them. So the thinking
      is at most max_thinking tokens, and a sample carries the cue only where it was forced.
    minimum (max_waits > 0): when the tokens chosen complete `think_end` while fewer than
      min_thinking tokens precede it (min_thinking 0: whatever the length, s1's "ignore the end
      of thinking N times"), and fewer than max_waits were replaced in the row, its tokens
      are taken back (`take_back`) and `wait` is emitted instead; the thinking goes on.
      Past the maximum nothing is replaced, and the maximum cuts a `wait` short.
  The delimiter is matched as the tokenizer spells it (the ids given); a model spelling it
  with other tokens is not seen closing its thinking.
  Forced tokens come from a queue in the state, never from the logits. After a replacement,
  the row's steps fold the count of replacements into their random keys: the loop's count
  then runs over values it had, and no draw reuses a key. Until a row is forced, its draws
  are those of `then` alone.
  """
  then: Rule
  think_end: tuple[int, ...]  # the end-of-thinking delimiter (`</think>` is several in Qwen2.5)
  max_thinking: int = 0  # most thinking tokens (0 = no maximum)
  answer_cue: tuple[int, ...] = ()  # forced after the delimiter at the maximum
  min_thinking: int = 0  # a delimiter after fewer is replaced (0 = any, while waits remain)
  wait: tuple[int, ...] = ()  # what replaces the delimiter ("Wait")
  max_waits: int = 0  # most replacements per row (0 = no minimum)

  def __post_init__(self):
    where = (f"BudgetForcing(max_thinking={self.max_thinking}, min_thinking="
             f"{self.min_thinking}, max_waits={self.max_waits})")
    if not self.think_end:
      raise ValueError(f"{where}: think_end is empty; give the end-of-thinking delimiter's "
                       "token ids")
    if self.max_thinking < 0 or self.min_thinking < 0 or self.max_waits < 0:
      raise ValueError(f"{where}: the counts must be >= 0 (0 = off)")
    if self.min_thinking and not self.max_waits:
      raise ValueError(f"{where}: a minimum is kept by replacing the delimiter; set max_waits "
                       "(how many times at most)")
    if not self.max_thinking and not self.max_waits:
      raise ValueError(f"{where} forces nothing: set max_thinking and/or max_waits, or "
                       "sample with the wrapped rule alone")
    if self.max_waits and not self.wait:
      raise ValueError(f"{where}: max_waits needs the `wait` tokens that replace the delimiter")
    if self.max_thinking and self.min_thinking > self.max_thinking:
      raise ValueError(f"{where}: the minimum exceeds the maximum; lower min_thinking")

  def init(self, rows: int) -> ForcingState:
    zeros = jnp.zeros((rows,), jnp.int32)
    return ForcingState(held=zeros, tail=jnp.full((rows, len(self.think_end) - 1), -1, jnp.int32),
                        closed=jnp.zeros((rows,), bool), waits=zeros, source=zeros, next=zeros,
                        stop=zeros, back=zeros, inner=self.then.init(rows))

  def take_back(self, state: ForcingState) -> jax.Array:
    return state.back

  def settings(self) -> dict:
    """The forcing settings, for `describe` (and so for provenance records)."""
    return dict(think_end=list(self.think_end), max_thinking_tokens=self.max_thinking,
                answer_cue=list(self.answer_cue), min_thinking_tokens=self.min_thinking,
                wait=list(self.wait), max_waits=self.max_waits)

  def __call__(self, logits_BV, keys_B, state: ForcingState):
    d = len(self.think_end)
    end = jnp.asarray(self.think_end, jnp.int32)
    keys_B = jnp.where(state.waits > 0, jax.vmap(jax.random.fold_in)(keys_B, state.waits),
                       keys_B)
    chosen, inner = self.then(logits_BV, keys_B, state.inner)
    # The longest start of the delimiter that the row's last tokens spell.
    matched = jnp.zeros_like(state.held)
    for j in range(1, d):
      matched = jnp.where(jnp.all(state.tail[:, d - 1 - j:] == end[:j], axis=-1), j, matched)
    close, wait = self.think_end + self.answer_cue, self.wait
    width = max(len(close), len(wait))
    queues = jnp.asarray([list(q) + [0] * (width - len(q)) for q in (close, wait)], jnp.int32)
    queued = state.next < state.stop
    from_queue = queues[state.source, jnp.minimum(state.next, width - 1)]
    thinking = ~state.closed
    spells = ~queued & (chosen == end[matched])  # the model goes on spelling the delimiter
    closes = thinking & spells & (matched == d - 1)
    replace = closes & (state.waits < self.max_waits)
    if self.min_thinking:
      replace &= state.held - (d - 1) < self.min_thinking
    at_budget = jnp.zeros_like(thinking)
    if self.max_thinking:
      # Past the budget a row may only go on spelling the delimiter (each token past it is
      # then part of it), and may not have it replaced.
      over = state.held >= self.max_thinking
      at_budget = thinking & over & ~spells
      replace &= ~over
    token = jnp.where(at_budget, queues[0, matched], jnp.where(
        queued, from_queue, jnp.where(replace, wait[0] if wait else 0, chosen)))
    back = jnp.where(replace, d - 1, 0)
    tail = state.tail
    if d > 1:  # the delimiter's start is taken back: what preceded it is not known here
      tail = jnp.where(replace[:, None], -1, tail)
      tail = jnp.concatenate([tail[:, 1:], token[:, None]], axis=1)
    state = ForcingState(
        held=state.held - back + 1, tail=tail,
        closed=state.closed | at_budget | (closes & ~replace),
        waits=state.waits + replace,
        source=jnp.where(at_budget, 0, jnp.where(replace, 1, state.source)),
        next=jnp.where(at_budget, matched + 1, jnp.where(replace, 1, state.next + queued)),
        stop=jnp.where(at_budget, len(close), jnp.where(replace, len(wait), state.stop)),
        back=back, inner=inner)
    return token.astype(jnp.int32), state


def describe(rule) -> dict:
  """{"rule", "temperature", "top_k", "top_p"} for reports; a rule that wraps another (a
  `then` field) reports the one it wraps, plus its own `settings()` where it has them (budget
  forcing's, only when forcing: records of runs without it stay as they were). Settings a
  rule does not have are None."""
  inner, own = rule, {}
  while hasattr(inner, "then"):
    if hasattr(inner, "settings"):
      own.update(inner.settings())
    inner = inner.then
  out = dict(rule=repr(rule), temperature=None, top_k=None, top_p=None, **own)
  if isinstance(inner, Greedy) or (isinstance(inner, Chain) and inner.greedy):
    out.update(temperature=0.0, top_k=0, top_p=1.0)
  elif isinstance(inner, Chain):
    temperature = 1.0
    out.update(top_k=0, top_p=1.0)
    for part in inner.parts:
      if isinstance(part, Temperature):
        temperature *= part.t
      elif isinstance(part, TopK):
        out["top_k"] = part.k
      elif isinstance(part, TopP):
        out["top_p"] = part.p
      else:
        temperature = None  # a map of its own: no single temperature describes it
    out["temperature"] = temperature
  return out


def sample_token(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int,
                 top_p: float, *, candidates: int = 256) -> jax.Array:
  """`rule_from(temperature, top_k, top_p)` applied once: [B] int32 ids from [B, V] logits,
  with [B] keys (one random stream per row) or a single key split over the rows."""
  rule = rule_from(temperature, top_k, top_p, candidates=candidates)
  keys = key if key.ndim else jax.random.split(key, logits_BV.shape[0])
  return rule(logits_BV, keys, rule.init(logits_BV.shape[0]))[0]


def _cut_and_draw(logits_BV: jax.Array, keys_B: jax.Array, top_k: TopK | None,
                  top_p: TopP | None) -> jax.Array:
  """A draw from softmax(logits) cut to top_k's likeliest ids, then to top_p's nucleus of the
  renormalised rest; ids tied with the last one kept stay.

  Sorting the whole vocabulary (152k ids for Qwen) costs more than the rest of a CPU decode
  step, so the cuts are found among the likeliest `candidates` (k + 1 with TopK) ids,
  without changing the rule: the cut is a logit threshold, exact as soon as some candidate
  falls below it (always, with TopK). When every id at or above the threshold is a candidate
  the draw is among the candidates, else (ties across the last candidate) over the whole
  vocabulary. Only a nucleus wider than the candidates sorts the whole vocabulary.
  """
  b, v = logits_BV.shape
  logits = logits_BV
  k = top_k.k if top_k else 0
  p = top_p.p if top_p else 1.0
  if k == 0 and p >= 1.0:
    return _draw(keys_B, logits)
  c = (k if k > 0 else top_p.candidates) + 1
  if c > v:
    return _draw(keys_B, _cut_by_sorting(logits, top_k, top_p))
  # Descending. Its columns are read by reductions and gathers, never by static slices: XLA
  # turns a top_k whose output is sliced into a sort of the whole row (~100x slower on CPU),
  # the very cost this avoids.
  vals, ids = jax.lax.top_k(logits, c)
  top = jnp.max(vals, -1, keepdims=True)
  last = jnp.min(vals, -1)
  if k > 0:
    first_k = jax.lax.broadcasted_iota(jnp.int32, vals.shape, 1) < k
    kth = jnp.min(jnp.where(first_k, vals, jnp.inf), -1, keepdims=True)  # the k-th largest
    kept = vals >= kth
    # Ids tied with the k-th but not among the candidates are kept too: they weigh in the
    # softmax the nucleus is cut from.
    ties_out = jnp.sum(logits == kth, -1, keepdims=True) - jnp.sum(vals == kth, -1,
                                                                    keepdims=True)
    w = jnp.where(kept, jnp.exp(vals - top), 0.0)
    probs = w / (jnp.sum(w, -1, keepdims=True) + ties_out * jnp.exp(kth - top))
  else:
    kept = jnp.ones(vals.shape, bool)
    probs = jnp.exp(vals - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
  if p < 1.0:
    kept &= (jnp.cumsum(probs, axis=-1) - probs) < p
  # The threshold is known once a candidate is cut (with TopK, the (k+1)-th always is).
  threshold = jnp.min(jnp.where(kept, vals, jnp.inf), axis=-1, keepdims=True)
  known = jnp.ones((b,), bool) if k > 0 else ~jnp.all(kept, -1)
  inside = last < threshold[:, 0]  # every id at or above the threshold is a candidate

  def among_candidates():
    pick = _draw(keys_B, jnp.where(vals >= threshold, vals, -jnp.inf))
    return jnp.take_along_axis(ids, pick[:, None], axis=1)[:, 0]

  branch = jnp.where(jnp.all(inside), 0, jnp.where(jnp.all(known), 1, 2))
  return jax.lax.switch(branch, [
      among_candidates,
      lambda: _draw(keys_B, jnp.where(logits >= threshold, logits, -jnp.inf)),
      lambda: _draw(keys_B, _cut_by_sorting(logits, top_k, top_p))])


def _cut_by_sorting(logits_BV, top_k: TopK | None, top_p: TopP | None) -> jax.Array:
  """The cuts as written, over the whole vocabulary."""
  for cut in (top_k, top_p):
    if cut is not None:
      logits_BV = cut(logits_BV)
  return logits_BV


def _draw(keys_B: jax.Array, logits_BC: jax.Array) -> jax.Array:
  return jax.vmap(jax.random.categorical)(keys_B, logits_BC).astype(jnp.int32)


def _first_argmax(x_BV: jax.Array) -> jax.Array:
  """`jnp.argmax` as two plain reductions: XLA:CPU's fused (value, index) reduction is several
  times slower over a 152k vocabulary."""
  top = jnp.max(x_BV, axis=-1, keepdims=True)
  ids = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, 1)
  return jnp.min(jnp.where(x_BV == top, ids, x_BV.shape[-1] - 1), axis=-1)
