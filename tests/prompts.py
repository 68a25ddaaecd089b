"""Eight world captions (one file, every category) for tests that launch the trainer on a tiny random model.

Launches whose subject is not the default data (resume, offload, ranks, faults) train on these instead of the
world's splits (176 distinct captions to encode): the text phase encodes 8 prompts, and the start/end grids sample
the first 4 of them instead of the 48 held-out ones (about 15 s less a launch on 2 CPU cores). The judge still
scores them: they are world captions."""

from pathlib import Path

SMALL_PROMPTS = Path(__file__).resolve().parent / "assets" / "prompts_small.txt"
