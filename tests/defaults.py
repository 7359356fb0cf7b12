"""The settings of configs/base.py, for tests that build a trainer or evaluator directly: the
dataclasses declare no defaults of their own."""

import dataclasses

from configs import base
from jaxdistill import settings


def base_settings() -> settings.Settings:
  return settings.parse(base.get_config())


def train_config(**changes):
  return dataclasses.replace(base_settings().train, **changes)


def optim_config(**changes):
  return dataclasses.replace(base_settings().optim, **changes)


def eval_config(**changes):
  return dataclasses.replace(base_settings().eval, **changes)
