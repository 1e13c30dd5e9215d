"""Ferry: continuous block-level replication of running Linux servers to Azure."""

__version__ = "0.1.0"
