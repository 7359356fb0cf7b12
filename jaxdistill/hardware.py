"""Accelerators the memory planner knows: per-device memory and peak FLOP/s, and topology
names ("8xH100", "v5p-128") resolved to a chip and a device count."""

from __future__ import annotations

import dataclasses
import re

@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  platform: str  # "gpu" | "tpu" | "cpu": decides what attention="auto" runs
  hbm_bytes: int  # memory one JAX device sees
  peak_flops: float  # dense bf16 FLOP/s per device


# One JAX device each. A v5p or v4 chip is two TensorCores run as one device (megacore), and
# Cloud TPU names count TensorCores for those generations: v5p-128 is 64 devices. Memory: what
# nvidia-smi reports for the GPUs; the TPU datasheets' "GB" read as 10^9 bytes (the lower).
_MiB = 1024 ** 2
CHIPS = {
    "H100": Chip("H100", "gpu", 81559 * _MiB, 989e12),
    "H200": Chip("H200", "gpu", 143771 * _MiB, 989e12),
    "A100": Chip("A100", "gpu", 81920 * _MiB, 312e12),
    "v4": Chip("TPU v4", "tpu", 32 * 10**9, 275e12),
    "v5e": Chip("TPU v5e", "tpu", 16 * 10**9, 197e12),
    "v5p": Chip("TPU v5p", "tpu", 95 * 10**9, 459e12),
    "v6e": Chip("TPU v6e", "tpu", 32 * 10**9, 918e12),
}
_CORES_PER_DEVICE = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  chip: Chip
  devices: int


def topology(name: str) -> Topology:
  """"8xH100", "16xH200", "v5p-128" (TensorCores, 64 devices), "v6e-256", "v5e-256"."""
  gpu = re.fullmatch(r"(\d+)x(H100|H200|A100)", name, re.IGNORECASE)
  if gpu:
    return Topology(name, CHIPS[gpu.group(2).upper()], int(gpu.group(1)))
  tpu = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name, re.IGNORECASE)
  if tpu:
    gen = tpu.group(1).lower()
    cores = int(tpu.group(2))
    if cores % _CORES_PER_DEVICE[gen]:
      raise ValueError(f"{name}: {gen} slices count TensorCores, two per device")
    return Topology(name, CHIPS[gen], cores // _CORES_PER_DEVICE[gen])
  raise ValueError(f"unknown topology {name!r}: use NxH100, NxH200, NxA100, v4-N, v5e-N, "
                   "v5p-N or v6e-N")
