"""dscluster: serve one PyTorch model split across ranks with DeepSpeed, and deploy it on Kubernetes."""

__version__ = "0.1.0"
