"""Serving: generation loop and CLI (`python -m infer.generate`)."""
