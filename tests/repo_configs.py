"""The repository's configs/*.py, loaded by path as `launch/train.py --config=configs/NAME.py:ARG` loads them.

`configs/` is a directory of config files, not a package: nothing puts it on `sys.path`.
"""
import importlib.util
import os

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_module(name: str):
  """The module of `configs/<name>.py`."""
  path = os.path.join(CONFIG_DIR, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"repo_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(name: str, arg=None):
  """`configs/<name>.py`'s `get_config(arg)`."""
  return config_module(name).get_config(arg)
