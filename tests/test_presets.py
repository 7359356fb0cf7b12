"""Full-size presets have their published parameter counts, computed abstractly."""

import jax
import pytest

from jaxdistill import model as model_lib
from jaxdistill.model_config import PRESETS, ModelConfig, get_preset

PUBLISHED = {
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_7b": 7_615_616_512,
    "qwen2_5_72b": 72_706_203_648,
    "llama3_2_1b": 1_235_814_400,
    "llama3_1_8b": 8_030_261_248,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_eval_shape_gives_published_parameter_count(name):
  abstract = model_lib.abstract_model(get_preset(name))
  leaves = model_lib.flat_params(abstract).values()
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  assert sum(x.size for x in leaves) == PUBLISHED[name]
  assert get_preset(name).num_params() == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_survives_the_hf_config_round_trip(name):
  cfg = get_preset(name)
  assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_model_config_is_rejected_with_reasons():
  with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
    ModelConfig(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="Unknown model preset 'qwen3'"):
    get_preset("qwen3")
