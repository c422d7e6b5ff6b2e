"""Language modelling with Hugging Face transformers: a tiny GPT-2 built from its config.

No download: the model is built from a `GPT2Config` and trained on a synthetic token corpus
with AdamW, gradient clipping and a linear warmup/decay schedule.

    python hf_causal_lm.py --run-dir runs/gpt2 --steps 30
"""

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup, set_seed
from zoo_result import finish, report_step, rng_state

import moai_ckpt

SEQ_LEN = 16
BATCH = 8


def make_corpus(n_seqs=256, vocab=96):
    # a corpus with some structure: each sequence counts up from a random start, with noise
    g = torch.Generator().manual_seed(7)
    start = torch.randint(0, vocab, (n_seqs, 1), generator=g)
    seqs = (start + torch.arange(SEQ_LEN + 1)) % vocab
    noise = torch.rand(seqs.shape, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, vocab, seqs.shape, generator=g), seqs)


@moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=8)
def train(run, run_dir, steps=30, out=None):
    set_seed(42)
    corpus = make_corpus()
    config = GPT2Config(
        vocab_size=96,
        bos_token_id=0,
        eos_token_id=0,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    model = GPT2LMHeadModel(config)
    no_decay = ["bias", "ln_1.weight", "ln_2.weight", "ln_f.weight"]
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=3e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=5, num_training_steps=steps)
    run.track(model=model, optimizer=optimizer, scheduler=scheduler)
    sampler = run.sampler(len(corpus), BATCH, seed=1)

    model.train()
    for step in run.steps(steps):
        input_ids = corpus[run.batch()]
        outputs = model(input_ids=input_ids, labels=input_ids)
        outputs.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        run.record(loss=outputs.loss, grad_norm=grad_norm)
        report_step(step, outputs.loss)

    finish(
        out,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": sampler.state_dict(),
            "rng": rng_state(),
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out")
    args = parser.parse_args()
    train(run_dir=args.run_dir, steps=args.steps, out=args.out)
