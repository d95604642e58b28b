"""The readers and writers behind export.py: checkpoint, model sources,
tokenizers, GGUF and Hugging Face output, and --verify."""
