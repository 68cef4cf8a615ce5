"""Models made here, since nothing is downloaded: tiny random checkpoints of every family
(tinymodels), the trained built-in models (builtin) and the generated architecture table (archdoc).
"""
