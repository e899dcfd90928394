"""tinystories: from raw TinyStories text to a small Llama-style model that writes children's stories.

The package is laid out by pipeline stage (docs/architecture.md): core < data < model < inference < training <
evaluation < export, with cli.py and quickstart.py on top. The module names of the earlier flat layout
(`tinystories.train`, `tinystories.checkpoint`, ...) still import: each is the module at its new home.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# the earlier flat module names, for users' scripts and notebooks: old name -> the module that holds it now
MOVED = {
    "errors": "core.errors", "atomic": "core.atomic", "config": "core.config", "defaults": "core.defaults",
    "metrics": "core.metrics",
    "textdata": "data.text", "tokenizer": "data.tokenizer", "cache": "data.cache", "prepare": "data.prepare",
    "checkpoint": "model.checkpoint", "device": "model.device", "calibrate": "model.calibrate",
    "likelihood": "model.likelihood",
    "sampling_params": "inference.params", "sampling": "inference.sampling", "generate": "inference.generate",
    "engine": "inference.frontend", "serve": "inference.server",
    "train": "training.loop", "schedule": "training.schedule", "optim": "training.optim",
    "sizing": "training.sizing", "memory": "training.memory",
    "evaluate": "evaluation.evaluate", "grammar": "evaluation.grammar", "story_stats": "evaluation.story_stats",
    "doctor": "evaluation.doctor", "plot": "evaluation.plot",
    "interop": "export.commands", "gguf_export": "export.gguf", "hub": "export.hub",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import tinystories.train` gives the module `tinystories.training.loop` itself (not a copy), so a
    monkeypatch or an isinstance check through the old name acts on the real thing."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, leaf = fullname.rpartition(".")
        if head == __name__ and leaf in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module):
        pass  # already executed under its new name


sys.meta_path.append(_MovedModules())
