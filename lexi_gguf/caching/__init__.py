"""Expert caching (MoE-Beyond, arXiv 2508.17137, done with look-ahead): record which experts the
runtime selects (trace), predict the next ones (predict), and replay decode through expert caches
(simulate)."""
