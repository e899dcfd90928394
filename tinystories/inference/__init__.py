"""Stage 3, a model writing text: sampling parameters, the decoding loop, the `generate` command, the serving
engine and the HTTP server with its playground."""
