"""ListOps at small scale: our generator and solver, the paper's LRA model, and a training script."""
