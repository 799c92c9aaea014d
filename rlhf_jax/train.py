"""Command line of RL training (every `config.algorithm`).

    python -m rlhf_jax.train --config=configs/tiny.py --config.rl.kl_coef=0.1 --workdir=runs/tiny

A workdir that already holds checkpoints is resumed from the newest readable one.
SIGTERM (a TPU VM preemption) saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

if __name__ == "__main__":  # it may restart the process, so before the heavy imports below
    from rlhf_jax.run.runtime import tune_process
    tune_process()

import json

import jax

from rlhf_jax.run.loop import train


def _main(config, workdir):
    from absl import flags
    trainer, state, history = train(config, workdir)
    if history:
        last = history[-1]
        print(json.dumps({"step": int(state.step), "objective/scores": last["objective/scores"],
                          "objective/kl": last["objective/kl"]}))
    if flags.FLAGS.export_dir:
        trainer.export_policy(state, flags.FLAGS.export_dir)  # every process takes part; process 0 writes
        if jax.process_index() == 0:
            print(f"policy exported to {flags.FLAGS.export_dir}")


def run():
    """Console entry point (`rlhf-jax-train`)."""
    from absl import flags

    from rlhf_jax.run.cli import run_cli
    run_cli(_main, "Path to a config file (a get_config() -> ConfigDict).",
            lambda: flags.DEFINE_string("export_dir", "", "Also write the final policy here as an HF folder."))


if __name__ == "__main__":
    run()
