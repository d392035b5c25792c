"""Training: the jitted step, the loop around it, checkpoints, data, the run log and evaluation."""
