"""Stage 3, the lexi GGUF: written from a Hugging Face checkpoint (convert, with llama.cpp's own
converter in hf_to_gguf and its quantizer) or from an existing GGUF (apply), and read back (inspect).
"""
