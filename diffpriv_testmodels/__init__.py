"""Seeded random-weight models with the real shapes, for the demo (`diffpriv --demo-weights`),
the tests and the benchmarks: ComfyUI-format checkpoints (comfy_models), face recognisers in
their real file formats (face_models), tiny diffusers models (tiny_diffusers), a toy host whose noise prediction the conditioning
decides (toy_host), where they are
cached (cache), and the pack run inside this process (inprocess).

Random weights make no pictures and recognise nobody: these exist to exercise code paths for
real. Nothing here is part of the method.
"""
