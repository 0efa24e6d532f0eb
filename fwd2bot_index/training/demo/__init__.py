"""The recipe that makes the shipped ``demo`` model, and the measurement of Fwd2Bot's claims on it.

No pretrained vision-language model can be downloaded here, so the project trains its own, small,
on the procedural shapes world (``fwd2bot_index.synthetic``). One module per stage:

- ``warmup``: stage 0, the vision tower reads the scene (probes on ground truth, fresh scenes);
- ``base``: stage 1, the LLM captions and answers from all visual tokens (multi-turn, ``turns``);
- ``compressor``: stage 2, Fwd2Bot (contrastive with hard negatives + autoregressive) and variants;
- ``recipe``: the numbers and the resumable stage runner (``train_demo_model``);
- ``measure`` / ``targets`` / ``report``: the claims on held-out scenes, the targets, the tables
  and the model card.

Run it as ``python -m fwd2bot_index.training.demo_recipe`` (see ``main``).
"""

from .compressor import VARIANTS, HardNegativeTrainer, info_nce_with_negatives
from .measure import EVAL_SEED, EVAL_SPLITS, blind_prior, measure_demo_claims, question_template, write_eval_world
from .recipe import FULL, QUICK, DemoRecipe, recipe_for, train_demo_model
from .report import CLAIMS_END, CLAIMS_START, MODULE_COMMAND, render_claims, write_claims_table, write_model_card
from .warmup import cell_weights

__all__ = [
    "CLAIMS_END", "CLAIMS_START", "EVAL_SEED", "EVAL_SPLITS", "FULL", "MODULE_COMMAND", "QUICK", "VARIANTS",
    "DemoRecipe", "HardNegativeTrainer", "blind_prior", "cell_weights", "info_nce_with_negatives",
    "measure_demo_claims", "question_template", "recipe_for", "render_claims", "train_demo_model",
    "write_claims_table", "write_eval_world", "write_model_card",
]
