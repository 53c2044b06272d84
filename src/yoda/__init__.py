"""YODA: medical image translation by 2.5D diffusion sampled as one-step regression."""

__version__ = "0.1.0"
