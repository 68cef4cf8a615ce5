"""`lexi-gguf serve`: an OpenAI-compatible local server (llama-cpp-python's own FastAPI app) that
serves one loaded model at every budget its file stores, switched per request without a reload."""
from .server import LexiProxy, build_app, model_ids, serve

__all__ = ["LexiProxy", "build_app", "model_ids", "serve"]
