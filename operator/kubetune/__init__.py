"""kubetune: Kubernetes-native fine-tuning of CLIP models for text-to-image search."""

__version__ = "0.1.0"
