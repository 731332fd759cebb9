"""Text classification task: Hugging Face sequence classifiers, embedding-space PGD and TextAttack recipes."""
