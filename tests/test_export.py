"""The export restores on any topology: one written by 2 processes x 4 devices (parameters split across the
processes) loads in a fresh 1-device process with the writer's parameters, bit for bit, and its embeddings.
The export of an 8-device training run is checked the same way in test_resume.py (which makes that run).
"""
import os
import socket
import subprocess
import sys

import numpy as np

import export_worker as worker
from vldeformer_jax.model.config import ModelConfig


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_export_from_2_processes_loads_in_a_1_device_process(tmp_path):
  port = _free_port()
  writers = [subprocess.Popen(
      [sys.executable, worker.__file__, "write", "--port", str(port), "--process_id", str(i), "--out", str(tmp_path)],
      env=worker.worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  worker.wait_all(writers)
  export_dir = str(tmp_path / "export")
  worker.wait_all([worker.start_reader(export_dir, str(tmp_path / "writer_params.npz"), str(tmp_path / "read.npz"))])
  worker.check_read(dict(np.load(tmp_path / "read.npz")), dict(np.load(tmp_path / "writer_params.npz")),
                    dict(np.load(tmp_path / "writer_embeddings.npz")),
                    ModelConfig.from_json(os.path.join(export_dir, "model_config.json")))
