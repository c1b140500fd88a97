"""The model: loaders (GGUF, Hugging Face folders), tokenizer, and the Llama-family transformer."""
