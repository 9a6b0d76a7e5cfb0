"""GRPO + LoRA fine-tuning inside a VRAM budget: recipe -> plan -> policy -> rollout -> sync -> loss -> checkpoint."""
__version__ = "0.1.0"
