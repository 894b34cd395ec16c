"""Diff-Privacy: the method, importable without ComfyUI."""
