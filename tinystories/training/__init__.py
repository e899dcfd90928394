"""Stage 4, a model learning: the loop and its step, the lr schedule, run state, progress reports, resume
resolution, batches, optimizers, sizing for a budget and the memory estimate."""
