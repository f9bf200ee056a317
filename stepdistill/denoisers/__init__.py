"""Denoiser adapters and loading from local diffusers directories."""

from stepdistill.denoisers.base import Denoiser

__all__ = ["Denoiser"]
