"""Accelerators: per-device memory and peak FLOP/s, for the memory planner and for MFU; JAX
devices and topology names ("8xH100", "v5p-128") resolved to a chip."""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  platform: str  # "gpu" | "tpu" | "cpu": decides what attention="auto" runs
  hbm_bytes: int  # memory one JAX device sees
  peak_flops: float  # dense bf16 FLOP/s per device (vendor figure, without sparsity)
  device_kind: str  # regex, fullmatched ignoring case, of the `jax.Device.device_kind`s


# One JAX device each, keyed by the name topology() takes. A v5p or v4 chip is two
# TensorCores run as one device (megacore), and Cloud TPU names count TensorCores for those
# generations: v5p-128 is 64 devices. Memory: what nvidia-smi reports for the GPUs; the TPU
# datasheets' "GB" read as 10^9 bytes (the lower). The PCIe and NVL H100s and the 40 GB A100
# are separate entries because their peak or memory differs from the SXM parts'; JAX names v5e
# and v6e "lite" and v5p plain "TPU v5", and "TPU v4 lite" is the v4i, not a v4.
_MiB = 1024 ** 2
CHIPS = {
    "H100": Chip("H100", "gpu", 81559 * _MiB, 989e12, r"NVIDIA H100( 80GB HBM3)?"),
    "H100-PCIe": Chip("H100 PCIe", "gpu", 81559 * _MiB, 756e12, r"NVIDIA H100 PCIe"),
    "H100-NVL": Chip("H100 NVL", "gpu", 95330 * _MiB, 835e12, r"NVIDIA H100 NVL"),
    "H200": Chip("H200", "gpu", 143771 * _MiB, 989e12, r"NVIDIA H200"),
    "A100": Chip("A100", "gpu", 81920 * _MiB, 312e12,
                 r"NVIDIA A100-SXM4-80GB|NVIDIA A100 80GB PCIe"),
    "A100-40GB": Chip("A100 40GB", "gpu", 40960 * _MiB, 312e12, r"NVIDIA A100-(SXM4|PCIE)-40GB"),
    "L40S": Chip("L40S", "gpu", 46068 * _MiB, 362e12, r"NVIDIA L40S"),
    "v4": Chip("TPU v4", "tpu", 32 * 10**9, 275e12, r"TPU v4"),
    "v5e": Chip("TPU v5e", "tpu", 16 * 10**9, 197e12, r"TPU v5( lite|e)"),
    "v5p": Chip("TPU v5p", "tpu", 95 * 10**9, 459e12, r"TPU v5p?"),
    "v6e": Chip("TPU v6e", "tpu", 32 * 10**9, 918e12, r"TPU v6( lite|e)"),
}
_CORES_PER_DEVICE = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


def chip_for_device(device) -> Chip | None:
  """The chip whose `device_kind` pattern matches `device` (a jax.Device), or None when none
  does (CPUs, unlisted accelerators): a caller then reports no MFU rather than a wrong one."""
  for chip in CHIPS.values():
    if re.fullmatch(chip.device_kind, device.device_kind, re.IGNORECASE):
      return chip
  return None


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  chip: Chip
  devices: int


def topology(name: str) -> Topology:
  """"8xH100", "16xH200", "4xL40S", "v5p-128" (TensorCores, 64 devices), "v6e-256"."""
  by_name = {k.lower(): k for k in CHIPS}
  gpu = re.fullmatch(r"(\d+)x(.+)", name, re.IGNORECASE)
  key = by_name.get(gpu.group(2).lower()) if gpu else None
  if key and CHIPS[key].platform == "gpu":
    return Topology(name, CHIPS[key], int(gpu.group(1)))
  tpu = re.fullmatch(r"(.+)-(\d+)", name)
  key = by_name.get(tpu.group(1).lower()) if tpu else None
  if key and CHIPS[key].platform == "tpu":
    cores = int(tpu.group(2))
    if cores % _CORES_PER_DEVICE[key]:
      raise ValueError(f"{name}: {key} slices count TensorCores, two per device")
    return Topology(name, CHIPS[key], cores // _CORES_PER_DEVICE[key])
  known = [f"Nx{k}" if c.platform == "gpu" else f"{k}-N" for k, c in CHIPS.items()]
  raise ValueError(f"unknown topology {name!r}: use one of {', '.join(known)}")
