"""Evaluation of a trained (or base) model on a cell's held-out pairs.

:func:`evaluate_model` runs everything the spec's ``evaluation`` section asks for: greedy
answers to held-out target-language and English prompts (:mod:`.generate`), language
fidelity and English retention (:mod:`.fidelity`), held-out NLL and CLO preference accuracy
(:mod:`.heldout`), the pairwise LLM-judge win rate (:mod:`.judge`) and the objective Tune
optimises (:mod:`.objective`); lm-evaluation-harness tasks (:mod:`.lm_eval`); the post-tune
judge stage against each cell's SFT trial (:mod:`.judge_stage`).
"""

from clo_ray.eval.evaluate import EXTRA_KEYS, EvaluationError, evaluate_model, scalar_metrics
from clo_ray.eval.fidelity import Fidelity, language_fidelity
from clo_ray.eval.generate import generate_answers, load_generator, resolve_backend
from clo_ray.eval.heldout import heldout_logps, heldout_metrics
from clo_ray.eval.judge import JudgeResult, judge_pairwise, make_judge, parse_verdict
from clo_ray.eval.objective import ObjectiveError, objective

__all__ = [
    "EXTRA_KEYS", "EvaluationError", "Fidelity", "JudgeResult", "ObjectiveError",
    "evaluate_model", "generate_answers", "heldout_logps", "heldout_metrics",
    "judge_pairwise", "language_fidelity", "load_generator", "make_judge", "objective",
    "parse_verdict", "resolve_backend", "scalar_metrics",
]
