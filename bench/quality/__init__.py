"""Does sharing keep quality? A paired comparison of LoRA and ShareLoRA arms on real labelled data, trained through
the plugin with ``python -m axolotl.cli.train`` on the embedded SmolLM2-135M-Instruct.

Tasks (JSONL rows ``{"prompt", "answer", "split", "choices"?}``; the built-in ones are converted to that format):
movie-review sentiment (the vaderSentiment source distribution's rated snippets) and word analogies (gensim's
``questions-words.txt``, answers held out by word pair), or the user's own via ``--task FILE.jsonl``.

Every arm trains on the same rows, in the same order, with the same learning rate and schedule at a given seed;
differences are paired by seed. The decision rules are fixed in :mod:`bench.quality.stats` and written into the
report before its numbers. ``--quick`` checks the pipeline in minutes and measures nothing; the full run is
resumable (a finished (arm, seed) run is kept and skipped when the command runs again).
"""
