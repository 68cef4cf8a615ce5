"""Expert caching (MoE-Beyond, arXiv 2508.17137, done with look-ahead): on traces of which experts the
runtime selected (lexi_gguf.runtime.trace), predict the next ones (predict) and replay decode through
expert caches (simulate); experiment is the testbed study."""
