"""Ray Tune over the grid: the Tuner, per-cell Optuna searcher and ASHA, the trial."""
