"""Packing: the row layout, over-length policy, best-fit bins, exact row counts, resumable state,
and, through a real model, that a packed example's logits and loss are those of it alone."""

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdistill import model as model_lib
from jaxdistill.data import packing
from jaxdistill.model_config import ModelConfig


def _random_examples(n, max_len, seed=0, vocab=1000, lengths=None):
  """Chat-like examples: a prompt (unscored) then a response (scored), sometimes two turns."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(rng.integers(2, max_len + 1) if lengths is None else rng.choice(lengths))
    tokens = rng.integers(3, vocab, length).astype(np.int32)
    mask = np.zeros(length, bool)
    start = int(rng.integers(1, length))
    mask[start:] = True
    if length > 6 and rng.random() < 0.3:  # a second user turn inside the response
      mask[start + (length - start) // 2:][:2] = False
      mask[-1] = True
    out.append((tokens, mask))
  return out


def _pack(examples, seq_len, **kwargs):
  elements = grain.MapDataset.source([{"examples": [e]} for e in examples])
  return packing.PackIterDataset(elements, seq_len=seq_len, **kwargs)


def _segments(row):
  """(segment id, start, end) of each segment in a row."""
  out = []
  for s in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
    idx = np.flatnonzero(row["segment_ids"] == s)
    out.append((int(s), int(idx[0]), int(idx[-1]) + 1))
  return out


def test_row_layout_is_the_documented_convention():
  row = packing.write_row([(np.array([5, 6, 7]), np.array([0, 1, 1], bool)),
                           (np.array([8, 9]), np.array([0, 1], bool))], seq_len=7)
  np.testing.assert_array_equal(row["inputs"], [5, 6, 7, 8, 9, 0, 0])
  np.testing.assert_array_equal(row["targets"], [6, 7, 0, 9, 0, 0, 0])
  np.testing.assert_array_equal(row["loss_mask"], [1, 1, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 0, 0])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 0, 0])
  assert {k: v.dtype for k, v in row.items()} == {
      "inputs": np.int32, "targets": np.int32, "loss_mask": bool, "positions": np.int32,
      "segment_ids": np.int32}


@pytest.mark.parametrize("mode,num_bins", [("pack", 1), ("pack", 4), ("pack", 16), ("pad", 4)])
def test_packed_rows_hold_every_example_intact(mode, num_bins):
  seq_len = 64
  examples = _random_examples(300, seq_len, seed=num_bins)
  rows = list(_pack(examples, seq_len, mode=mode, num_bins=num_bins))
  found = []
  for row in rows:
    assert all(v.shape == (seq_len,) for v in row.values())
    segs = _segments(row)
    assert [s for s, _, _ in segs] == list(range(1, len(segs) + 1))
    assert mode == "pack" or len(segs) == 1
    # Segments are contiguous from the start of the row; the rest is padding.
    assert all(e == s2 for (_, _, e), (_, s2, _) in zip(segs, segs[1:]))
    assert segs[0][1] == 0 and not row["segment_ids"][segs[-1][2]:].any()
    assert not row["loss_mask"][segs[-1][2]:].any()
    for _, start, end in segs:
      tokens = row["inputs"][start:end]
      np.testing.assert_array_equal(row["positions"][start:end], np.arange(end - start))
      # Targets are the next token of the same example; the last slot predicts nothing.
      np.testing.assert_array_equal(row["targets"][start:end - 1], tokens[1:])
      assert not row["loss_mask"][end - 1]
      found.append((tokens.tobytes(), row["loss_mask"][start:end - 1].tobytes()))
  # Every example exactly once, whole (never split across rows), its loss mask carried over.
  expected = [(t.tobytes(), m[1:].tobytes()) for t, m in examples]
  assert sorted(found) == sorted(expected)
  assert (sum(int(r["loss_mask"].sum()) for r in rows)
          == sum(int(m[1:].sum()) for _, m in examples))
  assert len(rows) == packing.count_packed_rows([len(t) for t, _ in examples], seq_len,
                                                mode=mode, num_bins=num_bins)


def test_best_fit_takes_the_tightest_row_and_closes_the_fullest():
  bins = packing.Bins(seq_len=10, num_bins=2)
  assert bins.add("a", 7) == [] and bins.add("b", 4) == []  # free: a 3, b 6
  assert bins.add("c", 3) == [["a", "c"]]  # fits both; the tightest (a) is then full: closed
  assert bins.add("d", 4) == []  # free: b 2
  assert bins.add("e", 5) == []  # fits nowhere: a second row opens; free: b 2, e 5
  assert bins.add("f", 6) == [["b", "d"]]  # fits nowhere, 2 rows open: the fullest closes
  assert bins.add("g", 4) == [["f", "g"]]  # fits e (5) and f (4): the tighter one
  assert bins.flush() == [["e"]]


def test_more_bins_pack_fuller():
  lengths = [len(t) for t, _ in _random_examples(2000, 512, seed=3)]
  counts = [packing.count_packed_rows(lengths, 512, num_bins=k) for k in (1, 4, 32)]
  pad = packing.count_packed_rows(lengths, 512, mode="pad")
  assert pad == 2000 and counts[0] > counts[1] > counts[2]
  assert sum(lengths) / (counts[2] * 512) > 0.95


def test_over_length_policy():
  tokens = np.arange(10, 20, dtype=np.int32)
  mask = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1], bool)  # prompt of 3, response of 7
  (t, m), outcome = packing.fit_length(tokens, mask, 10, "drop")
  assert outcome == packing.KEPT and len(t) == 10
  assert packing.fit_length(tokens, mask, 8, "drop") == (None, packing.TOO_LONG)
  (t, m), outcome = packing.fit_length(tokens, mask, 8, "truncate")
  assert outcome == packing.TRUNCATED
  np.testing.assert_array_equal(t, tokens[:8])  # the prompt kept, the tail cut
  row = packing.write_row([(t, m)], seq_len=8)
  # Scored: the kept response tokens 3..7 only. The cut response's last kept token predicts
  # nothing, so no end token it does not have is ever taught.
  np.testing.assert_array_equal(row["targets"][row["loss_mask"]], tokens[3:8])
  assert not row["loss_mask"][7]
  assert packing.fit_length(tokens, mask, 3, "truncate") == (None, packing.PROMPT_TOO_LONG)
  assert packing.fit_length(tokens, mask, 4, "truncate")[1] == packing.TRUNCATED
  nothing = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], bool)  # token 0 is never a target
  assert packing.fit_length(tokens, nothing, 20) == (None, packing.NO_SCORED_TARGET)


def test_state_resumes_exactly_at_every_row():
  examples = _random_examples(120, 48, seed=7)
  ds = _pack(examples, 48, num_bins=4)
  full = list(ds)
  for k in (0, 1, 5, len(full) // 2, len(full) - 1, len(full)):
    it = iter(ds)
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # it must survive JSON
    resumed = iter(ds)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(full) - k
    for a, b in zip(rest, full[k:]):
      for key in packing.ROW_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    assert resumed.get_state()["stats"] == it.get_state()["stats"] | {
        "rows": len(full), "kept": len(examples), "tokens": sum(len(t) for t, _ in examples),
        "scored_tokens": sum(int(m[1:].sum()) for _, m in examples)}


# -- Through the model ------------------------------------------------------------------------

def _nll(logits, targets):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def test_packed_logits_and_loss_equal_each_example_alone():
  vocab = 64
  cfg = ModelConfig(vocab_size=vocab, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64)
  graphdef, params = nnx.split(model_lib.create_model(cfg, seed=1))
  model = jax.jit(lambda p, *args: nnx.merge(graphdef, p)(*args)[0])
  # Few distinct lengths, so the examples-alone forward compiles only a few times.
  examples = _random_examples(14, 20, seed=11, vocab=vocab, lengths=(3, 7, 12, 18))
  rows = list(_pack(examples, 32, num_bins=3))
  assert max(len(_segments(r)) for r in rows) >= 3  # really packed
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in packing.ROW_KEYS}
  logits = model(params, batch["inputs"], batch["positions"], batch["segment_ids"])
  mask = batch["loss_mask"].astype(jnp.float32)
  packed_loss = jnp.sum(_nll(logits, batch["targets"]) * mask) / jnp.sum(mask)

  alone_sum, alone_count, checked = 0.0, 0, 0
  for b, row in enumerate(rows):
    for _, start, end in _segments(row):
      tokens = row["inputs"][start:end]
      alone = model(params, jnp.asarray(tokens)[None])
      np.testing.assert_allclose(np.asarray(logits[b, start:end]), np.asarray(alone[0]),
                                 atol=2e-5, rtol=2e-5)
      m = next(m for t, m in examples if np.array_equal(t, tokens))
      alone_sum += float(jnp.sum(_nll(alone[0, :-1], jnp.asarray(tokens[1:])) * m[1:]))
      alone_count += int(m[1:].sum())
      checked += 1
  assert checked == len(examples)
  np.testing.assert_allclose(float(packed_loss), alone_sum / alone_count, rtol=1e-5)
