"""Small-scale reproduction of the ShareLoRA claim on the embedded SmolLM2-135M-Instruct, CPU only.

    python -m bench.reproduce_small            # full run (`make reproduce`), about 50-55 min on 2 free CPU cores
    python -m bench.reproduce_small --quick    # the same pipeline on a couple of steps, about 4 min
    python -m bench.reproduce_small --threads 1   # on a machine shared with other work (2 contending threads
                                                  # run several times slower than 1)
    python -m bench.reproduce_small --seeds 0 --steps 40   # a shorter measurement
    python -m bench.reproduce_small --render   # rebuild the .md/.png from bench/results/reproduce_small.json

A finished run is reused when its generated YAML and share plan are unchanged (``--fresh`` retrains), so an
interrupted full run resumes where it stopped.

The paper's claim: at the same settings ShareLoRA reaches LoRA's accuracy with ~77-80 % of the trainable
parameters, and similarity-chosen share sets beat random adjacent sets (ShareLoRA*) and naive odd/even sharing.
This script measures that claim at a size that runs here, and reports what it finds whichever way it goes.

What runs (every method: same data, same seed(s), same steps, same learning rate, same schedule, LoRA r=8,
alpha 16, dropout 0.05 on q/k/v/up/down — nothing is tuned per method):

* ``lora``               plain LoRA, r = 8 (``adapter: lora``).
* ``sharelora``          ShareLoRA, greedy sets (Algorithm 1) at the ε that shares about one third of the layers
                         (``layers_saved`` closest to L/3, as in the paper), rank 8.
* ``sharelora_rx``       the same sets with rank expansion ``r' = ⌊L / (L − Σ|S| + |S|) · r⌋``.
* ``sharelora_optimal``  exact minimum-module sets (MILP) at the same ε, rank 8.
* ``sharelora_random``   ShareLoRA*: random adjacent sets saving as many layers as greedy (seeded per run).
* ``naive_share``        odd layer uses the even layer's modules: [[0, 1], [2, 3], ...].

Calibration runs once (the plugin's own calibration code on 64 Lee news texts, 16 in ``--quick``); every
ShareLoRA run then gets its plan through ``sharelora.plan_file``, so no run recalibrates. Each run is a real
``python -m axolotl.cli.train`` process with a generated YAML; the adapter it saves is evaluated in this process.

Data — all offline, and said exactly:

* Training: a rule-generated multiple-choice set in the exact ``commonsense_170k.json`` format
  (``instruction``/``input``/``output``/``answer``; LLM-Adapters' instruction wording and answer labels; trained
  with Axolotl's ``type: alpaca`` = the LLM-Adapters template, loss on the whole sequence), mixed with the 300
  Lee news articles (``lee_background.jsonl``, ``type: completion``).
* Five rule tasks, one per answer format of the eight commonsense sets: ``rule_boolq`` (true/false: is a word an
  example of a category), ``rule_piqa`` (solution1/2: which everyday action reaches a goal), ``rule_arc``
  (answer1-4: two-number addition/subtraction), ``rule_hellaswag`` (ending1-4: next number of an arithmetic
  sequence), ``rule_winogrande`` (option1/2: who fits the blank after a comparison). Train and test are disjoint
  by construction: held-out words, goals, number pairs, sequences and names never appear in training.
* Test: accuracy on the rule tasks' test split (24 rows per task, labels exactly balanced so a constant answer
  scores chance) with :mod:`bench.commonsense` (the LLM-Adapters protocol, greedy decoding, 8 new
  tokens); held-out answer loss (mean NLL per response token on the test split); held-out perplexity on the 50
  Lee test articles (``lee_test.jsonl``, first 256 tokens each, never trained on).
* Budget (``FULL``): 48 steps × micro-batch 4 × ≤128 tokens, lr 1e-3 (linear, 4 warmup steps), seeds 0 and 1:
  12 training runs. At this size the model learns the answer format but not the task content (see the caveats
  in the results), so Lee perplexity and the answer loss carry most of the comparison.

Outputs: ``bench/results/reproduce_small.{json,md,png}`` (``--quick``: ``<workdir>/quick/``; ``--results-dir`` to
change), run folders under ``--workdir`` (default ``outputs/reproduce_small``).

Run it from the repository root. One module per job: ``settings`` (the methods compared and the budgets),
``tasks`` (the rule tasks' data), ``runs`` (calibration, plans, training runs), ``evaluation`` (accuracy, losses,
adapter parameter counts), ``summary`` (per-method numbers and findings), ``report`` (the JSON, Markdown and
plot), ``__main__`` (the command line).
"""
