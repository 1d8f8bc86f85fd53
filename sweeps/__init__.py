"""Ray Tune studies: search spaces from YAML, the trial adapter, Tuner build/restore, the driver."""
