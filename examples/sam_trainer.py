"""A transformers Trainer fine-tune with SAM on token-embedding adversarial training (sam-at), then the
robust accuracy of the model in memory. Runs offline with samat's text defaults (MiniLM-L6, Rotten Tomatoes);
pass --model / --dataset for hub ids. Compared with a plain Trainer script, two lines change: the import and
``SAMTrainer(..., samat_args=...)``."""
import argparse

from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                          TrainingArguments)

from samat import SAMArguments, SAMTrainer, evaluate_model
from samat.text.data import load_raw
from samat.text.models import resolve_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="hub id or folder (default: samat's offline MiniLM-L6)")
parser.add_argument("--dataset", default=None, help="hub id with text/label columns (default: Rotten Tomatoes)")
parser.add_argument("--method", default="sam-at", help="sam, asam, pgd-at, sam-at, ...")
parser.add_argument("--train_examples", type=int, default=2000)
parser.add_argument("--eval_examples", type=int, default=200)
parser.add_argument("--output_dir", default="sam-trainer-out")
args = parser.parse_args()

name = resolve_model(args.model)
tokenizer = AutoTokenizer.from_pretrained(name)
model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=2)
data = load_raw(args.dataset).map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True)
data = data.rename_column("label", "labels").remove_columns("text")
train = data["train"].shuffle(seed=0).select(range(args.train_examples))
test = data["test"].select(range(args.eval_examples))

training_args = TrainingArguments(args.output_dir, per_device_train_batch_size=32, learning_rate=5e-5,
                                  num_train_epochs=1, warmup_ratio=0.1, logging_steps=10, report_to=[],
                                  save_strategy="no", seed=0)
trainer = SAMTrainer(model=model, args=training_args, train_dataset=train,
                     data_collator=DataCollatorWithPadding(tokenizer), samat_args=SAMArguments(method=args.method))
trainer.train()
trainer.save_model(args.output_dir)
tokenizer.save_pretrained(args.output_dir)

record = evaluate_model(trainer.model.eval(), test, collate_fn=DataCollatorWithPadding(tokenizer), steps=5)
print("clean accuracy", round(record["metrics"]["clean"]["accuracy"], 3))
if record["attacks_skipped"]:  # a model that predicts one class is not attacked (train longer)
    print("attacks skipped:", record["attacks_skipped"])
for attack, by_eps in record["metrics"]["robust"].items():
    for eps, metrics in by_eps.items():
        print(f"{attack} eps {eps}: accuracy {metrics['accuracy']:.3f}")
