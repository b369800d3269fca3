"""Downstream evaluation of saved HF checkpoints with lm-evaluation-harness 0.4.x, fully offline.

`eval_data` fetches the validation splits (`python -m bliss_ray.evaluation.eval_data fetch`), `tasks/` is an
lm-eval `--include_path` folder with the local paper tasks, and `harness.evaluate_checkpoint` runs them.
"""
