"""Evaluating optimizers on the sine-rollout task: the search fitness and the held-out comparison."""
