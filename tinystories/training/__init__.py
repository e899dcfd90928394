"""Stage 4, a model learning: the loop and its step (loop), the run it trains (run), batches, the run length and
lr schedule (length, schedule), run state, device-side meters, progress reports, the `train` command and its
resume resolution (command, resume), optimizers, sizing for a budget and the memory estimate."""
