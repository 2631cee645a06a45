"""Evaluation of a trained (or base) model on a cell's held-out pairs.

:func:`evaluate_model` runs everything the spec's ``evaluation`` section asks for: greedy
answers to held-out target-language and English prompts (:mod:`.generate`), language
fidelity and English retention (:mod:`.fidelity`), held-out NLL and CLO preference accuracy
(:mod:`.heldout`), the pairwise LLM-judge win rate (:mod:`.judge`) and the objective Tune
optimises (:mod:`.objective`); lm-evaluation-harness tasks (:mod:`.lm_eval`); the post-tune
judge stage against each cell's SFT trial (:mod:`.judge_stage`).
"""
