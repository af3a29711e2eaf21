"""hf_r1ewc: continual learning for diffusion models with rank-1 Fisher EWC and generative distillation."""

__version__ = "0.1.0"
