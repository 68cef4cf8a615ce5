"""Stage 4, measurement: which configurations are compared (configs: full, uniform k, LExI), speed
(bench), quality (evaluate: perplexity, KL divergence), a model larger than memory (memlimit), their
plots (plots), and the report of every saved bench result (report: docs/results.md).
"""
