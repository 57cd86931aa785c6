"""gpu-manager: a GPU coordinator daemon for one GPU host."""

__version__ = "0.1.0"
