"""Evaluation toolkit: the paper's protection, recovery, identification, utility and
diversity measurements on real photos, plus baselines (blur, mosaic, identity guidance
without diffusion) and a report writer.

Nothing here imports ComfyUI. dlib and face_recognition_models are imported lazily, so
importing this package never needs them.
"""
