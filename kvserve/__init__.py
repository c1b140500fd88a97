"""kvserve: an LLM inference engine whose center is the KV cache."""
