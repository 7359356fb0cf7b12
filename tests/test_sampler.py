"""Sampler: greedy equals transformers' generate, padding invariance, stops, sampling laws,
sampling rules as objects (stateless and with per-row state)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdistill import hf, rules
from jaxdistill import sampler as sampler_lib
from jaxdistill.rules import sample_token
from jaxdistill.sampler import Sampler, SamplingConfig, pack_prompts
from tests import hf_fixtures

GREEDY = SamplingConfig(rules.Greedy(), max_new_tokens=12)


def _assert_varied(results):
  """Every greedy sample holds several distinct tokens: comparing such outputs tests the KV
  cache (a model that repeats one token would match whatever the cache held)."""
  for samples in results:
    for s in samples:
      assert len(set(s.tokens.tolist())) > 3, s.tokens


def _prompts(lengths, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(3, 320, n).tolist() for n in lengths]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_equals_transformers_generate(kind, request):
  """On models whose greedy continuations vary (hf_fixtures), so a decoder that ignored its
  KV cache fails: one whose decode steps attend only to themselves does, on both models (at
  Hugging Face's stock init it passed on the tied Qwen2 model, which repeats one token)."""
  sampler = Sampler.from_model(hf.load_hf_model(request.getfixturevalue(f"tiny_{kind}_dir")))
  ref = hf_fixtures.tiny_hf_model(kind)
  prompts = _prompts([7, 19])
  got = sampler.generate(prompts, GREEDY)
  for prompt, samples in zip(prompts, got):
    with torch.no_grad():
      want = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].numpy()
    assert len(set(want.tolist())) > 5, want
    np.testing.assert_array_equal(samples[0].tokens, want)
    assert samples[0].finish_reason == "length"


def test_padding_invariance(tiny_qwen2_dir):
  sampler = Sampler.from_model(hf.load_hf_model(tiny_qwen2_dir))
  prompts = _prompts([5, 40, 13, 2], seed=1)  # prefilled packed into one row of 64
  assert len(pack_prompts(prompts, 64)[0]) == 1
  alone = sampler.generate([prompts[2]], GREEDY)[0][0].tokens
  batched = sampler.generate(prompts, GREEDY)
  _assert_varied(batched)
  np.testing.assert_array_equal(batched[2][0].tokens, alone)
  in_small_batches = sampler.generate(prompts, GREEDY, batch_size=2)
  for a, b in zip(batched, in_small_batches):
    np.testing.assert_array_equal(a[0].tokens, b[0].tokens)


def test_prompts_pack_first_fit_decreasing_into_rounded_rows():
  prompts = _prompts([30, 20, 50, 7, 60, 3])
  tokens, positions, segments, rows, offsets = pack_prompts(prompts, 64)
  # Longest first, each into the first row with room: 60 + 3 | 50 + 7 | 30 + 20, three rows.
  assert tokens.shape == (3, 64) and rows.tolist() == [2, 2, 1, 1, 0, 0]
  for i, p in enumerate(prompts):
    span = slice(offsets[i], offsets[i] + len(p))
    np.testing.assert_array_equal(tokens[rows[i], span], p)
    np.testing.assert_array_equal(positions[rows[i], span], np.arange(len(p)))
    assert len(set(segments[rows[i], span].tolist())) == 1
  # One segment id per prompt of a row, 0 on the rest.
  assert segments[0].max() == 2 and (segments[0] > 0).sum() == 63
  # Row counts round up to 1, 2, 3, 4, 6, 8, 12, ... (a compile each): five rows make six, the
  # last one padding; never more rows than prompts.
  five = _prompts([40, 40, 40, 40, 40, 10, 10])
  tokens, _, segments, rows, _ = pack_prompts(five, 64)
  assert tokens.shape == (6, 64) and sorted(set(rows.tolist())) == [0, 1, 2, 3, 4]
  assert not tokens[5].any() and not segments[5].any()
  assert len(pack_prompts(_prompts([40] * 5), 64)[0]) == 5
  assert len(pack_prompts(prompts, 64, multiple=8)[0]) == 8
  assert len(pack_prompts(prompts[:2], 64)[0]) == 1
  assert len(pack_prompts(prompts, 2048)[0]) == 1
  with pytest.raises(ValueError, match="prompt 4 has 60 tokens; rows hold 1 to 32"):
    pack_prompts(prompts, 32)


def test_stop_tokens_end_rows_independently(tiny_llama_dir):
  sampler = Sampler.from_model(hf.load_hf_model(tiny_llama_dir))
  prompts = _prompts([6, 9], seed=2)
  free = sampler.generate(prompts, GREEDY)
  _assert_varied(free)
  stop = int(free[0][0].tokens[3])
  got = sampler.generate(prompts, SamplingConfig(rules.Greedy(), max_new_tokens=12,
                                                 stop_ids=(stop,)))
  first = list(free[0][0].tokens).index(stop)
  np.testing.assert_array_equal(got[0][0].tokens, free[0][0].tokens[:first + 1])
  assert got[0][0].finish_reason == "stop"
  if stop not in free[1][0].tokens.tolist():
    np.testing.assert_array_equal(got[1][0].tokens, free[1][0].tokens)
    assert got[1][0].finish_reason == "length"


def test_samples_are_seeded_and_prompt_prefilled_once(tiny_qwen2_dir):
  sampler = Sampler.from_model(hf.load_hf_model(tiny_qwen2_dir))
  cfg = SamplingConfig(rules.rule_from(1.0), max_new_tokens=8)
  prompts = _prompts([4, 11], seed=3)
  a = sampler.generate(prompts, cfg, num_samples=4, seed=7)
  b = sampler.generate(prompts, cfg, num_samples=4, seed=7)
  c = sampler.generate(prompts, cfg, num_samples=4, seed=8)
  flat = lambda r: [s.tokens.tolist() for x in r for s in x]  # noqa: E731
  assert flat(a) == flat(b) and flat(a) != flat(c)
  assert len({tuple(s.tokens) for s in a[0]}) > 1  # the samples differ from each other
  # A prompt's samples decoded in groups (each prefilled again), slots refilled across
  # prompts: the same samples, in the same order.
  for at_once, batch in ((2, 3), (1, 2)):
    timings = {}
    got = sampler.generate(prompts, cfg, num_samples=4, seed=7, samples_at_once=at_once,
                           batch_size=batch, timings=timings)
    assert flat(got) == flat(a), (at_once, batch)
    assert timings["prefill"] > 0 and timings["decode"] > 0
  with pytest.raises(ValueError, match="samples_at_once=3 must divide num_samples=4"):
    sampler.generate(prompts, cfg, num_samples=4, samples_at_once=3)


def _frequencies(logits, n=20000, **kw):
  keys = jax.random.split(jax.random.key(0), n)
  draw = jax.jit(jax.vmap(lambda k: sample_token(jnp.asarray(logits)[None], k, **kw)[0]))
  return np.bincount(np.asarray(draw(keys)), minlength=len(logits)) / n


def test_sampling_follows_temperature_top_k_and_top_p():
  logits = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05]))
  # temperature 1: the softmax itself (tolerance ~4 standard errors at n=20000)
  np.testing.assert_allclose(_frequencies(logits, temperature=1.0, top_k=0, top_p=1.0),
                             [0.4, 0.3, 0.15, 0.1, 0.05], atol=0.015)
  # temperature 0.5 squares and renormalises the probabilities
  p = np.array([0.4, 0.3, 0.15, 0.1, 0.05]) ** 2
  np.testing.assert_allclose(_frequencies(logits, temperature=0.5, top_k=0, top_p=1.0),
                             p / p.sum(), atol=0.015)
  # top-k 2 keeps the two likeliest, renormalised
  np.testing.assert_allclose(_frequencies(logits, temperature=1.0, top_k=2, top_p=1.0),
                             [4 / 7, 3 / 7, 0, 0, 0], atol=0.015)
  # top-p 0.8 keeps 0.4 + 0.3 + 0.15 (the mass before 0.15 is 0.7 < 0.8), renormalised
  np.testing.assert_allclose(_frequencies(logits, temperature=1.0, top_k=0, top_p=0.8),
                             [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0], atol=0.015)
  # greedy
  assert _frequencies(logits, n=10, temperature=0.0, top_k=0, top_p=1.0)[0] == 1.0


@pytest.mark.parametrize("candidates", [3, 1])
def test_cuts_among_candidates_equal_the_full_vocabulary_rule(candidates):
  # top-p 0.8 keeps 3 ids: with 3 (+1) candidates the cut is found among them; with 1 (+1)
  # the nucleus is wider and the whole vocabulary is sorted. The law is the same.
  logits = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05]))
  np.testing.assert_allclose(
      _frequencies(logits, temperature=1.0, top_k=0, top_p=0.8, candidates=candidates),
      [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0], atol=0.015)
  # ties at the k-th logit are all kept, as by the full rule (here they straddle the candidates)
  ties = np.log(np.array([0.1, 0.4, 0.2, 0.2, 0.1]))
  np.testing.assert_allclose(_frequencies(ties, temperature=1.0, top_k=2, top_p=1.0),
                             [0, 0.5, 0.25, 0.25, 0], atol=0.015)
  # greedy over a row of ties takes the first, as jnp.argmax does
  assert _frequencies(np.zeros(5), n=10, temperature=0.0, top_k=0, top_p=1.0)[0] == 1.0


def test_rule_parts_as_written():
  logits = jnp.asarray(np.log([[0.1, 0.4, 0.2, 0.2, 0.1]]))
  inf = -np.inf
  # Greedy: the first of tied maxima, whatever the key.
  assert rules.Greedy()(jnp.asarray([[1.0, 3.0, 3.0, 2.0]]), None, ())[0].tolist() == [1]
  np.testing.assert_allclose(rules.Temperature(0.5)(logits), logits * 2)
  # TopK keeps ids tied with the k-th: top-2 is 0.4 and both 0.2s.
  np.testing.assert_array_equal(np.isfinite(rules.TopK(2)(logits)), [[0, 1, 1, 1, 0]])
  # TopP keeps an id while the mass before it is below p: 0.4 (before: 0) and 0.2 (0.4); the
  # other 0.2, tied with the last one kept, stays too.
  np.testing.assert_array_equal(np.isfinite(rules.TopP(0.5)(logits)), [[0, 1, 1, 1, 0]])
  np.testing.assert_array_equal(np.isfinite(rules.TopP(0.3)(logits)), [[0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(rules.TopK(9)(logits), logits)  # k past the vocabulary
  assert float(rules.TopP(0.3)(logits)[0, 0]) == inf
  for bad, match in [(lambda: rules.chain(rules.TopP(0.9), rules.TopK(5)), "one TopK, then"),
                     (lambda: rules.chain(rules.TopP(0.9), rules.Temperature(2.0)), "after every"),
                     (lambda: rules.chain(rules.Greedy(), rules.Temperature(2.0)), "comes last"),
                     (lambda: rules.chain(rules.TopK(3), rules.Greedy()), "argmax"),
                     (lambda: rules.Temperature(0.0), "Greedy"),
                     (lambda: SamplingConfig(rules.Temperature(0.7)), "rules.chain")]:
    with pytest.raises(ValueError, match=match):
      bad()


@pytest.mark.parametrize("temperature, top_k, top_p, candidates", [
    (1.0, 0, 0.8, 3), (1.0, 0, 0.8, 1), (0.7, 2, 1.0, 256), (1.3, 3, 0.7, 256),
    (0.5, 0, 1.0, 256)])
def test_chained_rules_draw_what_sample_token_draws_by_the_rule_as_written(
    temperature, top_k, top_p, candidates):
  """The chain fuses TopK/TopP into one cut among candidates (with 1 candidate the nucleus is
  wider: the vocabulary is sorted). Same keys, same draws as `sample_token` (whose draws the
  refactor kept: checked against the earlier implementation on 576 settings); and the law of
  the draws is the softmax of the parts applied as written, over the whole vocabulary."""
  logits = np.log(np.array([0.1, 0.3, 0.15, 0.15, 0.25, 0.05]))
  parts = [rules.Temperature(temperature)] + ([rules.TopK(top_k)] if top_k else []) + (
      [rules.TopP(top_p, candidates)] if top_p < 1 else [])
  rule = rules.chain(*parts)
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)
  got = jax.jit(jax.vmap(lambda k: rule(jnp.asarray(logits)[None], k[None], ())[0][0]))(keys)
  want = jax.jit(jax.vmap(lambda k: sample_token(
      jnp.asarray(logits)[None], k[None], temperature, top_k, top_p,
      candidates=candidates)[0]))(keys)
  np.testing.assert_array_equal(got, want)
  as_written = jnp.asarray(logits)[None]
  for part in parts:
    as_written = part(as_written)
  law = np.asarray(jax.nn.softmax(as_written[0]))
  assert (law == 0).any() or not (top_k or top_p < 1)  # the cuts cut something
  np.testing.assert_allclose(np.bincount(np.asarray(got), minlength=6) / n, law, atol=0.015)


def test_sampling_config_describes_its_rule():
  cfg = SamplingConfig(rules.rule_from(0.6, top_k=20, top_p=0.95), max_new_tokens=7,
                       cache_dtype="bfloat16")
  d = cfg.describe()
  assert (d["temperature"], d["top_k"], d["top_p"], d["max_new_tokens"], d["cache_dtype"]) == (
      0.6, 20, 0.95, 7, "bfloat16")
  greedy = dataclasses.replace(cfg, rule=rules.Greedy()).describe()
  assert (greedy["temperature"], greedy["top_k"], greedy["top_p"]) == (0.0, 0, 1.0)
  assert hash(cfg) != hash(dataclasses.replace(cfg, rule=rules.Greedy()))  # a static jit arg
  assert rules.rule_from(0.0, top_k=5) == rules.Greedy()


@dataclasses.dataclass(frozen=True)
class _ForbidEarly:
  """A rule with per-row state: `token` may not be a row's first `steps` tokens."""
  token: int
  steps: int
  then: rules.Rule = rules.Greedy()

  def init(self, rows):
    return jnp.zeros((rows,), jnp.int32), self.then.init(rows)

  def __call__(self, logits_BV, keys_B, state):
    chosen, inner = state
    ids = jax.lax.broadcasted_iota(jnp.int32, logits_BV.shape, 1)
    banned = (ids == self.token) & (chosen < self.steps)[:, None]
    tokens, inner = self.then(jnp.where(banned, -jnp.inf, logits_BV), keys_B, inner)
    return tokens, (chosen + 1, inner)


def test_a_rule_with_per_row_state_runs_in_the_decode_loop(tiny_llama_dir):
  """The loop carries the rule's state per row, advancing it each step and resetting it when a
  row is refilled: one slot decoding the prompts in turn forbids the token in every prompt's
  first steps, as a batch does, and each output follows greedy up to where greedy chose the
  token; forbidden only before greedy's choice, the token comes where greedy put it."""
  sampler = Sampler.from_model(hf.load_hf_model(tiny_llama_dir))
  prompts = _prompts([6, 9, 4, 11], seed=7)
  free = [s[0].tokens.tolist() for s in sampler.generate(prompts, GREEDY)]
  token = free[2][3]  # early in a row that one slot only reaches by refills
  assert token not in free[2][:3], free
  until_chosen = SamplingConfig(_ForbidEarly(token, 3), max_new_tokens=12)
  assert sampler.generate(prompts, until_chosen)[2][0].tokens.tolist() == free[2]
  steps = 6
  cfg = SamplingConfig(_ForbidEarly(token, steps), max_new_tokens=12)
  for batch_size in (None, 1):
    got = [s[0].tokens.tolist() for s in sampler.generate(prompts, cfg, batch_size=batch_size)]
    for want, row in zip(free, got):
      assert token not in row[:steps], (batch_size, row)
      first = want.index(token) if token in want[:steps] else len(want)
      assert row[:first] == want[:first], (batch_size, row, want)
      assert len(row) == 12


def test_prompt_too_long_is_a_clear_error(tiny_qwen2_dir):
  sampler = Sampler.from_model(hf.load_hf_model(tiny_qwen2_dir))
  with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
    sampler.generate(_prompts([500]), SamplingConfig(max_new_tokens=20))


def test_generate_file_resumes_to_the_same_output(tiny_qwen2_dir, tmp_path):
  import json
  from jaxdistill import generate
  from jaxdistill.data import chat
  from tests import hf_fixtures as fx
  tok_dir = fx.save_tiny_chatml_tokenizer(tmp_path / "tok")
  renderer = chat.ChatRenderer(chat.load_tokenizer(str(tok_dir)), "chatml")
  sampler = Sampler.from_model(hf.load_hf_model(tiny_qwen2_dir))
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"the answer is {i}", "id": i}) + "\n"
                             for i in range(5)))
  cfg = SamplingConfig(rules.rule_from(1.0, top_p=0.95), max_new_tokens=6,
                       stop_ids=generate.stop_ids(renderer))
  full = tmp_path / "full.jsonl"
  generate.generate_file(sampler, renderer, str(prompts), str(full), cfg, num_samples=2,
                         batch_size=2)
  lines = full.read_text().splitlines()
  assert len(lines) == 5 and [json.loads(x)["id"] for x in lines] == list(range(5))
  row = json.loads(lines[0])
  assert len(row["response"]) == len(row["finish_reason"]) == 2
  # Interrupted after three lines and half of the fourth: the rerun ends identical.
  cut = tmp_path / "cut.jsonl"
  cut.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
  generate.generate_file(sampler, renderer, str(prompts), str(cut), cfg, num_samples=2,
                         batch_size=2)
  assert cut.read_text() == full.read_text()


def test_ids_past_the_tokenizer_vocabulary_are_never_sampled(tiny_qwen2_dir):
  sampler = Sampler.from_model(hf.load_hf_model(tiny_qwen2_dir))  # 320 rows
  cfg = SamplingConfig(rules.rule_from(5.0), max_new_tokens=30, vocab_size=40)
  got = sampler.generate(_prompts([5, 8]), cfg, num_samples=4)
  ids = np.concatenate([s.tokens for x in got for s in x])
  assert ids.max() < 40 and len(set(ids.tolist())) > 10


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1, 1), (2, 2, 1, 2)])
def test_sharded_sampling_equals_unsharded(mesh_shape, tiny_qwen2_dir):
  from jaxdistill import sharding
  prompts = _prompts([5, 17, 9], seed=5)  # 3 prompts: padded to the data-parallel size
  want = Sampler.from_model(hf.load_hf_model(tiny_qwen2_dir)).generate(prompts, GREEDY)
  _assert_varied(want)
  mesh = sharding.make_mesh(mesh_shape)
  sampler = Sampler.from_model(hf.load_hf_model(tiny_qwen2_dir, mesh), mesh)
  got = sampler.generate(prompts, GREEDY)
  assert len(got) == 3
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a[0].tokens, b[0].tokens)
  # Sampled with the top-k / top-p cuts: each device draws for its own rows, with the rows'
  # own random streams, so the samples are the unsharded ones.
  cfg = SamplingConfig(rules.rule_from(0.8, top_k=40, top_p=0.9), max_new_tokens=12)
  want = Sampler.from_model(hf.load_hf_model(tiny_qwen2_dir)).generate(prompts, cfg,
                                                                        num_samples=2)
  got = sampler.generate(prompts, cfg, num_samples=2)
  for a, b in zip(got, want):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x.tokens, y.tokens)


def _record_growth(monkeypatch) -> list[int]:
  """The cache lengths generate grows to from now on, in order."""
  sizes = []
  grow = sampler_lib._grow  # pylint: disable=protected-access
  monkeypatch.setattr(sampler_lib, "_grow",
                      lambda state, length: sizes.append(length) or grow(state, length))
  return sizes


def test_refilled_rows_give_the_same_samples_as_a_fresh_batch(tiny_llama_dir, monkeypatch):
  """Also with a cache that grows (from 2 answer slots, doubled as rows need them, rows then
  refilled into the grown cache): the same samples as with every slot from the start."""
  sampler = Sampler.from_model(hf.load_hf_model(tiny_llama_dir))
  prompts = _prompts([3, 12, 7, 32, 5], seed=6)  # in 32 slots: the longest needs more
  # Sampling among 30 ids, 5 of them stops: samples end after a few steps, at different
  # steps, so prompts finish at different times and rows get refilled.
  cfg = SamplingConfig(rules.rule_from(1.0, top_p=0.95), max_new_tokens=12, vocab_size=30,
                       stop_ids=(3, 4, 5, 6, 7))
  all_at_once = sampler.generate(prompts, cfg, num_samples=2, seed=3)
  two_slots = sampler.generate(prompts, cfg, num_samples=2, seed=3, batch_size=2,
                               decode_chunk=3)
  one_slot = sampler.generate(prompts, cfg, num_samples=2, seed=3, batch_size=1)
  sizes = _record_growth(monkeypatch)
  grown = sampler.generate(prompts, cfg, num_samples=2, seed=3, batch_size=2, decode_chunk=3,
                           grow_from=2)
  assert sizes and sizes == sorted(set(sizes)) and sizes[-1] <= 32 + 12, sizes
  # A sampler looping over its layers holds them in one cache array: it never grows it.
  looped = Sampler.from_model(hf.load_hf_model(tiny_llama_dir), unroll=1)
  assert looped.stacks == 1
  sizes.clear()
  looped.generate([prompts[3]], GREEDY, decode_chunk=3, grow_from=2)
  assert not sizes
  lengths = set()
  for a, b, c, d in zip(all_at_once, two_slots, one_slot, grown):
    for x, y, z, w in zip(a, b, c, d):
      for other in (y, z, w):
        np.testing.assert_array_equal(x.tokens, other.tokens)
        assert x.finish_reason == other.finish_reason
      lengths.add(len(x.tokens))
  assert len(lengths) > 2  # rows really finished at different times


def _spans(tokens, ids):
  """Start indices of `ids` as a contiguous run in `tokens`."""
  n = len(ids)
  return [i for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n]) == tuple(ids)]


def test_budget_forcing_ends_thinking_at_the_budget(tiny_llama_dir, monkeypatch):
  """At thinking budget B every sample's thinking (the tokens before the delimiter) is at most
  B tokens, and the forced delimiter and answer cue appear once, the cue right after it. The
  rows' draws are those of the unforced rule up to where they were forced; where a row's last
  tokens already begin the delimiter only the rest is forced. The forced run decodes one
  sample per group in two slots, refilled: each row's forcing starts afresh."""
  sampler = Sampler.from_model(hf.load_hf_model(tiny_llama_dir))
  prompts = _prompts([6, 9, 4], seed=7)
  budget, new = 5, 14
  rule = rules.rule_from(1.0, top_k=40)
  free = sampler.generate(prompts, SamplingConfig(rule, max_new_tokens=new), num_samples=2)
  # The delimiter begins with the token the first sample chose last within the budget.
  end = (int(free[0][0].tokens[budget - 1]), 301, 302)
  cue = (310, 311)
  cfg = SamplingConfig(rules.BudgetForcing(rule, end, max_thinking=budget, answer_cue=cue),
                       max_new_tokens=new)
  got = sampler.generate(prompts, cfg, num_samples=2, batch_size=2, samples_at_once=1)
  # Tokens taken back and rewritten in a cache that grows meanwhile: the same samples.
  sizes = _record_growth(monkeypatch)
  grown = sampler.generate(prompts, cfg, num_samples=2, batch_size=2, samples_at_once=1,
                           decode_chunk=2, grow_from=1)
  assert len(sizes) > 1, sizes
  assert [[s.tokens.tolist() for s in x] for x in grown] == [
      [s.tokens.tolist() for s in x] for x in got]
  for free_samples, samples in zip(free, got):
    for f, s in zip(free_samples, samples):
      tokens = s.tokens.tolist()
      starts = _spans(tokens, end)
      assert len(starts) == 1 and _spans(tokens, cue) == [starts[0] + len(end)], tokens
      thinking = starts[0]
      assert thinking <= budget and tokens[:thinking] == f.tokens[:thinking].tolist()
  assert _spans(got[0][0].tokens.tolist(), end) == [budget - 1]
  assert any(_spans(s.tokens.tolist(), end) == [budget] for x in got for s in x)
  described = cfg.describe()
  assert described["max_thinking_tokens"] == budget and described["answer_cue"] == list(cue)
  assert described["temperature"] == 1.0 and "max_thinking_tokens" not in GREEDY.describe()


def _rigged_model_dir(directory, successor):
  """A tiny Llama whose greedy next token depends only on the current one: attention and MLP
  outputs are zeroed, so the final norm sees the token's embedding, and the head scores
  `successor[token]` far above every other id for each token in `successor`."""
  model = hf_fixtures.tiny_hf_model("llama")
  with torch.no_grad():
    for layer in model.model.layers:
      layer.self_attn.o_proj.weight.zero_()
      layer.mlp.down_proj.weight.zero_()
    model.model.norm.weight.fill_(1.0)
    emb = model.model.embed_tokens.weight
    unit = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()
    head = torch.zeros_like(model.lm_head.weight)
    for token, nxt in successor.items():
      head[nxt] += unit[token]
    model.lm_head.weight.copy_(head)
  model.save_pretrained(directory)
  return str(directory)


def test_wait_replaces_a_multi_token_delimiter_n_times_then_lets_it_close(tmp_path):
  """A model rigged to spell the three-token delimiter d1 d2 d3 every five tokens
  (a b d1 d2 d3 a ...): with two "Wait"s (w1 w2, which the model continues with a), the first
  two delimiters are taken back as they complete (d1 d2 removed, w1 w2 written in their
  place) and the third closes the thinking; later ones are kept, and the budget, never
  reached by the thinking, forces nothing."""
  a, b, d1, d2, d3, w1, w2 = 10, 11, 12, 13, 14, 15, 16
  sampler = Sampler.from_model(hf.load_hf_model(_rigged_model_dir(
      tmp_path, {a: b, b: d1, d1: d2, d2: d3, d3: a, w1: w2, w2: a})))
  cfg = SamplingConfig(rules.BudgetForcing(rules.Greedy(), (d1, d2, d3), max_thinking=11,
                                           answer_cue=(20,), wait=(w1, w2), max_waits=2),
                       max_new_tokens=20)
  got = sampler.generate([[5, 7, a], [9, a]], cfg)
  want = [b, w1, w2, a, b, w1, w2, a, b, d1, d2, d3, a, b, d1, d2, d3, a, b, d1]
  for samples in got:
    assert samples[0].tokens.tolist() == want and samples[0].finish_reason == "length"


def test_taken_back_tokens_leave_no_trace_in_the_cache(tiny_llama_dir):
  """Replacing a delimiter the model spelled rewinds the row: what follows the "Wait" is what
  the model continues from the prompt, the tokens before the delimiter and the "Wait" (a
  fresh prefill of them). Stale cache entries of the delimiter would change it."""
  sampler = Sampler.from_model(hf.load_hf_model(tiny_llama_dir))
  prompt = _prompts([6], seed=7)
  cfg = SamplingConfig(rules.Greedy(), max_new_tokens=16)
  free = sampler.generate(prompt, cfg)[0][0].tokens.tolist()
  end, wait = (free[3], free[4]), (305, 306)
  assert not _spans(free[:3], end) and len(set(free)) > 5, free
  forced = dataclasses.replace(cfg, rule=rules.BudgetForcing(rules.Greedy(), end, wait=wait,
                                                             max_waits=1))
  got = sampler.generate(prompt, forced)[0][0].tokens.tolist()
  head = free[:3] + list(wait)
  assert got[:5] == head
  again = sampler.generate([prompt[0] + head], cfg)[0][0].tokens.tolist()
  assert got[5:] == again[:11]


def test_budget_forcing_minimum_and_settings():
  """The rule alone, fed logits that prefer a fixed successor of the row's last token (the
  loop's part, taking back, done by hand): the delimiter 7 8 is replaced by "Wait" (5) while
  fewer than min_thinking tokens precede it, then kept though waits remain. Settings that
  force nothing or contradict each other are refused, naming what to set."""
  successor = {0: 1, 1: 7, 7: 8, 8: 1, 5: 1}
  rule = rules.BudgetForcing(rules.Greedy(), (7, 8), min_thinking=4, wait=(5,), max_waits=5)
  step = jax.jit(rule)
  state, out, keys = rule.init(1), [], jax.random.split(jax.random.key(0), 1)
  while len(out) < 10:
    logits = jax.nn.one_hot([successor[out[-1] if out else 0]], 10)
    token, state = step(logits, keys, state)
    out = out[:len(out) - int(rule.take_back(state)[0])] + [int(token[0])]
  # 1 7 8: 1 token before the delimiter -> 1 5; 1 5 1 7 8: 3 -> 1 5 1 5; then 5 tokens: kept.
  assert out == [1, 5, 1, 5, 1, 7, 8, 1, 7, 8] and int(state.waits[0]) == 2
  assert int(state.held[0]) == len(out)
  for bad, match in [(dict(), "forces nothing"), (dict(max_waits=1), "wait"),
                     (dict(min_thinking=3), "set max_waits"),
                     (dict(max_thinking=3, min_thinking=4, wait=(5,), max_waits=1), "exceeds"),
                     (dict(max_thinking=-1), ">= 0")]:
    with pytest.raises(ValueError, match=match):
      rules.BudgetForcing(rules.Greedy(), (7, 8), **bad)
  with pytest.raises(ValueError, match="think_end is empty"):
    rules.BudgetForcing(rules.Greedy(), (), max_thinking=3)
