"""A tiny causal LM trained by ``transformers.Trainer`` under `MoaiTrainerCallback` (a real process).

    python -m tests.scenarios.hf_scenario RUN_DIR OUT_DIR
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.scenarios.hf_scenario RUN_DIR OUT_DIR

The model is built from a config (nothing downloaded); the data is a small in-memory dataset;
the global batch is the same on any number of processes. With ``MOAI_TEST_PAUSE_AT=K`` each
process writes ``OUT_DIR/paused-<rank>`` in the middle of step K (in the forward pass) and waits
there to be killed. Completed steps append ``{"step", "loss", "replayed"}`` lines to
``OUT_DIR/losses-<rank>.jsonl``; the end writes ``OUT_DIR/result-<rank>.json`` (the sha256 of
every tensor of the model and optimizer, the scheduler's state, the RNG state and the replay
report).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any

import torch

SAMPLES, BATCH, EPOCHS, SEQ, VOCAB = 40, 4, 2, 12, 64  # 10 global batches of 4 an epoch, 20 steps in all
TOTAL_STEPS = SAMPLES // BATCH * EPOCHS
RANK = int(os.environ.get("RANK", "0"))


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=g)
    return [{"input_ids": t, "labels": t.clone()} for t in tokens]


class Progress:
    """Losses of completed steps as they complete, and the pause the test kills the run in."""

    def __init__(self, moai: Any, out_dir: str, model: torch.nn.Module) -> None:
        self.moai = moai
        self.out_dir = out_dir
        self.losses: list[float] = []
        self.step = 0
        model.register_forward_hook(self._forward)

    def _forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if module.training:
            self.losses.append(float(output.loss.detach()))
            if os.environ.get("MOAI_TEST_PAUSE_AT") == str(self.step):
                with open(os.path.join(self.out_dir, f"paused-{RANK}"), "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(600)  # the test kills the process here

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step + 1

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        line = {"step": state.global_step, "loss": self.losses.pop(), "replayed": self.moai.replaying}
        with open(os.path.join(self.out_dir, f"losses-{RANK}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def train(run_dir: str, out_dir: str) -> None:
    """The training run (in this process)."""
    # imported here: the test imports this module for its constants, without transformers' import time
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments, set_seed

    from moai_ckpt.integrations.hf import MoaiTrainerCallback

    class ProgressCallback(Progress, TrainerCallback):
        pass

    torch.set_num_threads(1)
    set_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)  # dropout 0.1
    model = GPT2LMHeadModel(config)
    moai = MoaiTrainerCallback(run_dir, snapshot_every=4)
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "hf"),
        per_device_train_batch_size=BATCH // int(os.environ.get("WORLD_SIZE", "1")),
        num_train_epochs=EPOCHS,
        learning_rate=5e-3,
        lr_scheduler_type="cosine",
        warmup_steps=3,
        weight_decay=0.01,
        save_strategy="no",
        report_to="none",
        logging_steps=5,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    progress = ProgressCallback(moai, out_dir, model)
    trainer = Trainer(
        model=model, args=args, train_dataset=moai.dataset(dataset(), BATCH, seed=2), callbacks=[moai, progress]
    )
    trainer.train()
    tensors = {f"model.{k}": sha(v) for k, v in model.state_dict().items()}
    for pid, state in trainer.optimizer.state_dict()["state"].items():
        tensors.update({f"optim.{pid}.{k}": sha(v) for k, v in state.items() if isinstance(v, torch.Tensor)})
    report = moai.report
    result = {
        "tensors": tensors,
        "scheduler": trainer.lr_scheduler.state_dict(),
        "rng": sha(torch.get_rng_state()),
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "resumed_from": moai.resumed_from,
        "report": report.model_dump(mode="json") if report is not None else None,
    }
    with open(os.path.join(out_dir, f"result-{RANK}.json"), "w") as f:
        json.dump(result, f)


def main() -> None:
    train(sys.argv[1], sys.argv[2])


if __name__ == "__main__":
    main()
