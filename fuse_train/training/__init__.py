"""The training loop and what it keeps: the run's parts, state, evaluation, progress and logs."""
