"""The LExI method, from weights to per-layer k: architectures as data (archs), weight sources
(weights: safetensors; gguf_weights: a GGUF's own tensors), Stage 1 sensitivity (profile, and the
calibrated variant calib), Stage 2 allocation under a budget (allocate) and what each backend can run
(backends).
"""
