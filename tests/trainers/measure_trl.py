"""In the TRL venv, from a copy of the run folder: run the README's TRL snippet for 2 steps, then measure one
epoch of the trainer's own dataloader (rows per domain, loss mask). argv: model folder, result JSON."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from labels import answers, measure, readme_block, save, substitute  # noqa: E402

model, result = sys.argv[1], Path(sys.argv[2])
run = Path.cwd()
snippet = readme_block(run, "TRL", "python")
snippet = substitute(snippet, '"<model>"', repr(model))
snippet = substitute(snippet, "num_train_epochs=1,", "num_train_epochs=1, max_steps=2, report_to=[],")
scope: dict = {}
exec(compile(snippet, "README.md (TRL)", "exec"), scope)  # the README's code, as printed but for the two edits
trainer = scope["trainer"]


def examples():
    for batch in trainer.get_train_dataloader():
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            keep = mask.bool()
            yield ids[keep].tolist(), labels[keep].tolist()


out = measure(examples(), trainer.processing_class, answers(run))
out |= {
    "steps": trainer.state.global_step,
    "num_train_epochs": trainer.args.num_train_epochs,
    "bf16": trainer.args.bf16,
    "version": __import__("trl").__version__,
}
save(result, out)
