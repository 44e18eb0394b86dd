"""Training: the stage runner, the epoch loop on Accelerate, checkpoint state and run directories."""
