"""Training: losses (pure torch), schedules, the Ray Train loop."""
