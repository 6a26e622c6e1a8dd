"""Generation on a Hugging Face causal LM: batched prefill + decode with a KV cache, streamed token by token."""
