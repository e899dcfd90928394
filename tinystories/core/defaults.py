"""Defaults that `tinystories CMD --help` shows and the stages use: one home each, in a module that imports nothing,
so that the command line answers without importing torch, numpy or pydantic (see cli.py)."""

# data / tokenizer (prepare.py, config.TokenizerConfig)
REPORT_STORIES = 2000  # held-out stories a tokenizer report measures
TOKENIZER_MAX_STORIES = 100_000  # stories a tokenizer trains on: bytes/token improves little beyond (tokenizer_sample)

# eval (evaluate.py)
DEFAULT_STORIES = 20  # stories generated for the story statistics
PROMPT_KINDS = ("openings", "held-out")

# doctor (doctor.py)
SAMPLE_STORIES = 8  # stories sampled for the article and grammar checks

# serve (serve.py)
DEFAULT_MAX_BATCH = 16  # benchmarks/serve_load.py: see docs/playground.md
DEFAULT_MAX_QUEUE = 256
