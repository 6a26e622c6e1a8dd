"""deltaserve's server: one resident base model serving every stored delta through an OpenAI-compatible API."""
