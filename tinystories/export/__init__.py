"""Stage 6, moving models to other programs: llama2.c, Hugging Face (and the Hub) and GGUF for llama.cpp/Ollama."""
