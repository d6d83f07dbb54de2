"""Trains (or resumes) a VLDeformer model: `vldeformer_jax.training.loop.train_and_evaluate(config, workdir)`.

  python launch/train.py --config=configs/demo.py --workdir=runs/demo/decompose [--config.train.num_steps=300]

Multi-host: start one process per host with the same flags plus --coordinator_address, --num_processes and
--process_id (or let SLURM / a TPU pod set them; see parallel.initialize_distributed). Re-running the
same command resumes from the workdir's latest checkpoint that restores; a second run on a workdir in use
stops at once. An invalid config (an unknown field included) prints one line per problem and exits with
status 2 before anything is compiled; other bad input one line and status 1 (`--verbose`: the traceback).
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vldeformer_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the export.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Our INFO lines (init summary, evaluation) stay; orbax's per-file chatter goes below WARNING.
  logging.set_verbosity(logging.WARNING)
  import logging as py_logging
  py_logging.getLogger("vldeformer_jax").setLevel(py_logging.INFO)
  from vldeformer_jax import parallel
  from vldeformer_jax.training import loop as train

  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("done: %s", {k: v for k, v in summary.items() if k != "eval"})


if __name__ == "__main__":
  cli.run(main)
