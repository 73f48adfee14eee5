"""byzps: Byzantine-robust distributed training with a parameter server over TCP."""

__version__ = "0.1.0"
