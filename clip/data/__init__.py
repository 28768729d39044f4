"""Data: the training pipeline and the evaluation datasets."""
