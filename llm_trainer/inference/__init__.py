"""Inference: a trained model loaded to generate text (used by sample.py, serve.py, eval.py and GRPO)."""
