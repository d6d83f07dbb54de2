"""Test-wide setup: 8 simulated CPU devices, set before the JAX backend starts."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_configure(config):
  # Tests that restore a deliberately damaged checkpoint or export (tests/test_resume.py, tests/test_convert.py)
  # leave orbax's other reads of it pending when the restore fails; Python collects them later, in whichever
  # test of the worker runs next, and pytest reports them there as unraisable exceptions. Only these two
  # reports are ignored; any other unraisable exception is still shown.
  for message in (r"Exception ignored in. <coroutine object _read_array_index_and_device_put",
                  r"Exception ignored in. None[\s\S]*call_soon_threadsafe[\s\S]*Event loop is closed"):
    config.addinivalue_line("filterwarnings", f"ignore:{message}:pytest.PytestUnraisableExceptionWarning")
