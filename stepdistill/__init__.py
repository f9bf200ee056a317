"""stepdistill: step distillation for diffusers models."""
__version__ = "0.1.0"
