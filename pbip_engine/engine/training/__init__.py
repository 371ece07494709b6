"""Training machinery shared by every method: input conversion, AMP, optimisation, checkpoints, loops."""
