"""launch/train.py with configs/tiny.py run from tests as a user runs it: the environment and the command.

The runs of one worker share a persistent compilation cache (in pytest's base temp dir), so the identical
train step compiles once per worker; the tiny demo data is generated once per base temp dir.
"""
import os
import sys

from repo_configs import config_module
from vldeformer_jax.training import setup as train_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_env(tmp_path_factory) -> tuple[dict, str]:
  """(the environment of a training subprocess: 8 simulated devices, the shared cache; the data dir)."""
  base = tmp_path_factory.getbasetemp()
  data_dir = str(base / "tiny_data")
  train_setup.generate_demo(config_module("tiny").get_config(), data_dir)  # skipped when another test made it
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
              JAX_COMPILATION_CACHE_DIR=str(base / "jit_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0"), data_dir


def train_command(workdir: str, data_dir: str) -> list[str]:
  return [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"]
