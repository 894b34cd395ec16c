"""Face detection, alignment and recognisers."""
