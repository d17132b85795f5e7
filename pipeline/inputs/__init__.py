"""What scan checks and records before any stage works: the whole params.yaml against the
backbone and head registries, and the inputs DVC cannot see."""
