"""hetpure_bench: a benchmark for diffusion-based adversarial purification."""

__version__ = "0.1.0"
