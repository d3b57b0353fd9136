"""The kubetune trainer: open_clip fine-tuning with evaluation, checkpoints and artifacts."""
