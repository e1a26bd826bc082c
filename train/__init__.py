"""Training: LightningModule for the align and instruct stages, callbacks, CLI."""
