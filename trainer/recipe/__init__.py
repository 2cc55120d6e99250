"""`semsearch train run RECIPE.yaml`: the whole training recipe in one resumable command.

The recipe names the data, the base model and the steps:
prepare -> extend-vocab (when the tokenizer misses corpus characters) -> N rounds of mine -> finetune
-> (reranker) -> (score -> distil) -> evaluate -> (promote). Each step runs the same function as its
`semsearch train <step>` command and writes into `<work_dir>/<step>-<key>/`, where the key hashes
everything the output depends on: its settings, the content of its input files and the keys of the
steps it reads from. A step is done when its `.done.json` marker exists (written last, atomically):
a re-run skips done steps, a changed setting re-runs that step and everything downstream, and a run
killed anywhere (`kill -9`) re-runs only the unfinished step: fine-tuning continues from its last
checkpoint (`save_steps`), teacher scoring from its last written chunk; prepare, extend-vocab, mine
and evaluate start that step over (minutes at most).

Layout: schema.py (the file and its checks), cache.py (step keys and markers), steps.py (one function
per step and `PIPELINE`, their order), runner.py (running them, the report).

Every problem in the recipe (unknown key, missing file, impossible setting) is reported before any
step runs, as `recipe.yaml: steps.finetune.epochs: <reason>`.
"""


from trainer.recipe.cache import DONE, Run, StepRecord, step_key
from trainer.recipe.runner import report_markdown, run_recipe
from trainer.recipe.schema import Recipe, RecipeError, load_recipe
from trainer.recipe.steps import PIPELINE, UNTRAINED, State

__all__ = ["DONE", "PIPELINE", "UNTRAINED", "Recipe", "RecipeError", "Run", "State", "StepRecord",
           "load_recipe", "report_markdown", "run_recipe", "step_key"]
