"""Command-line client that drives ComfyUI through its HTTP API."""
