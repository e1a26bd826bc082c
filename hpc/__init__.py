"""Cluster launch: Slurm rendering and submission, DeepSpeed/FSDP presets."""
