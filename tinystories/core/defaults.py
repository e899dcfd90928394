"""Defaults that `tinystories CMD --help` shows and the stages use: one home each, in a module that imports nothing,
so that the command line answers without importing torch, numpy or pydantic (see cli.py)."""

# story openings: the one list of prompts that start a story (the training run's sample, the quickstart's three
# stories, eval's "openings", the model card's sample)
OPENINGS = (
    "Once upon a time",
    "One day,",
    "Lily and Ben",
    "There was a little dog",
    "Once upon a time, there was a little girl named",
    "Tom had a big red ball.",
    "The sun was shining and",
    "Mom said,",
    "In a small house in the woods,",
    "Sam wanted to",
)
QUICKSTART_OPENINGS = ("Once upon a time", "One day, a little girl named Lily", "Tom and his dog")
SAMPLE_PROMPT = OPENINGS[0]

# data / tokenizer (prepare.py, config.TokenizerConfig)
REPORT_STORIES = 2000  # held-out stories a tokenizer report measures
BYTES_PER_TOKEN = 4.0  # TinyStories text per token of a 4K-10K byte-level BPE (4.1 measured at 4K): sizes from bytes
TOKENIZER_MAX_STORIES = 100_000  # stories a tokenizer trains on: bytes/token improves little beyond (tokenizer_sample)

# eval (evaluate.py)
DEFAULT_STORIES = 20  # stories generated for the story statistics
PROMPT_KINDS = ("openings", "held-out")

# doctor (doctor.py)
SAMPLE_STORIES = 8  # stories sampled for the article and grammar checks

# serve (inference/server.py)
DEFAULT_MAX_BATCH = 16  # benchmarks/serve_load.py: see docs/playground.md
DEFAULT_MAX_QUEUE = 256
INFERENCE_DTYPES = ("float32", "bfloat16", "int8", "auto")  # generate/eval/serve --dtype (model/precision.py)
