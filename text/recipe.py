"""The text task's recipe (:class:`samat.common.recipe.TaskRecipe`): torch-free, read by the task class, the
sweep and reproduce grids, model cards and the evaluation. Radii are relative to the mean token-embedding norm
(``text/task.py``)."""

from samat.common.recipe import TaskDefaults, TaskRecipe

RECIPE = TaskRecipe(
    name="text",
    headline_metric="accuracy",
    pixel_space=False,
    input_key=None,  # the perturbation lives on the token embeddings, computed inside the model
    pipeline_tag="text-classification",
    saved_config="config.json",  # a transformers save_pretrained folder
    defaults=TaskDefaults(
        # BERT fine-tuning recipe (Devlin et al.; Mosbach et al. 2021): AdamW, linear warm-up then decay. The top
        # of the usual 2e-5..5e-5 range: with 3e-5 and the short CPU schedule, SAM had not left the majority
        # class after 96 steps (clean 0.56), while ERM reached 0.78.
        optimizer="adamw", lr=5e-5, weight_decay=0.01, lr_scheduler="linear", warmup_ratio=0.1,
        epochs=3, batch_size=32, eval_batch_size=64,
        # Embedding-space AT radius per token, relative to the mean token-embedding norm (see text/task.py:
        # 2 % keeps clean accuracy at ERM's on the default schedule; 5-10 % drifts to the majority class).
        # L-inf 0.001 per coordinate is about as large as L2 0.02 for D = 384.
        train_norm="l2", train_eps_l2="0.02", train_eps_linf="0.001",
        train_alpha_ratio=0.5, train_steps=2,  # steps of eps/2 (FreeLB-style), 2 of them
        # Half clean, half adversarial loss (like FreeLB's average along its ascent path): the pure
        # adversarial loss from a fresh head collapsed to the majority class on a short schedule (text/task.py).
        at_clean_weight=0.5,
        # The sharpness probe costs (1 + 5) forward/backward passes per example and radius: keep it small on
        # CPU so the default run stays near 10 minutes.
        cpu_sharpness_examples=64,
        # CPU: a subset so that `scripts/run.py --task text --method sam` (MiniLM, 2 cores) finishes in about
        # 10 minutes on an idle machine: 189 SAM steps at ~1.45 s, PGD at 2 radii on 100 sentences, TextAttack
        # on 30 sentences (see bench/README.md for what a shared machine measured). A GPU uses the full data.
        cpu_max_train_samples=2000, cpu_max_eval_samples=100,
    ),
    # The images' 1:2:4:8 ladder around the text defaults: L-inf 0.001, L2 0.02.
    eps_grid_linf=("0.00025", "0.0005", "0.001", "0.002"),
    eps_grid_l2=("0.005", "0.01", "0.02", "0.04"),
    # Robust-accuracy radii: per-token L2 (the FreeLB threat model). On an ERM MiniLM on Rotten Tomatoes
    # (clean 0.78) they give 0.585 and 0.23: hurt, not zeroed. L-inf in embedding space is off by default
    # (--eval_linf 0.001 is about as strong as L2 0.02).
    eval_linf=(),
    eval_l2=("0.02", "0.05"),
)
