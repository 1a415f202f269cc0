"""Training: the Skywork-MoE trainer, its data pipeline, checkpoints and metric plots."""
