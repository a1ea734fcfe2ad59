"""lucatrain: DeepSpeed pretraining for gene/protein language models."""

__version__ = "0.1.0"
