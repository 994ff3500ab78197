"""Training: what each stage minimises, the training log, and GRPO's rewards and rollouts."""
