"""Text generation: tokenizer, Llama-family model, sampler and the batching engine."""
