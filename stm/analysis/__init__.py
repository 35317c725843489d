"""Reading back what runs wrote (result files, offline wandb runs): tables and curves, never a running model."""
