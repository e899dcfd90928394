"""Stage 1, text to tokens: readers and the Hub download (text), tokenizers, the fingerprinted token cache and
the data/tokenizer commands (prepare)."""
