"""The GGUF format layer: key names (keys), reading files (reader), writing them (writer). Depends on
nothing else in lexi_gguf; every other stage reads and writes GGUF through it.
"""
