"""A word-level LSTM language model trained with truncated backpropagation through time.

The token stream is cut into BATCH parallel streams; each step trains on the next BPTT tokens of
each and carries the LSTM's hidden state over to the next step (detached), as in the classic
PyTorch word_language_model example. The hidden state is tracked, so a resumed run carries on
with the very same state.

    python lstm_tbptt.py --run-dir runs/lstm --steps 40
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo_result import finish, report_step, rng_state

import moai_ckpt

VOCAB = 64
BATCH = 8
BPTT = 12


class LSTMLM(nn.Module):
    def __init__(self, vocab=VOCAB, emb=32, hidden=48, layers=2, dropout=0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, layers, dropout=dropout)
        self.decoder = nn.Linear(hidden, vocab)
        self.layers, self.hidden = layers, hidden

    def forward(self, x, state):
        out, state = self.rnn(self.drop(self.encoder(x)), state)
        return self.decoder(self.drop(out)), state

    def init_hidden(self, batch):
        return torch.zeros(self.layers, batch, self.hidden), torch.zeros(self.layers, batch, self.hidden)


def batchify(n_tokens=2400):
    # a synthetic "text": a random walk over the vocabulary, so there is something to learn
    g = torch.Generator().manual_seed(3)
    steps = torch.randint(-2, 3, (n_tokens,), generator=g)
    tokens = torch.cumsum(steps, 0) % VOCAB
    n = n_tokens // BATCH
    return tokens[: n * BATCH].view(BATCH, n).t().contiguous()  # (time, batch)


@moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=9)
def train(run, run_dir, steps=40, out=None):
    torch.manual_seed(1111)
    data = batchify()
    model = LSTMLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    h, c = model.init_hidden(BATCH)
    carry = {"h": h, "c": c, "pos": 0}  # where the streams are, and the LSTM state there
    run.track(model=model, optimizer=optimizer, scheduler=scheduler, carry=carry)

    model.train()
    for step in run.steps(steps):
        pos = carry["pos"]
        if pos + BPTT + 1 > len(data):  # a new pass over the text: start from a fresh state
            pos = 0
            carry["h"], carry["c"] = model.init_hidden(BATCH)
        x, y = data[pos : pos + BPTT], data[pos + 1 : pos + 1 + BPTT]
        optimizer.zero_grad()
        logits, (h, c) = model(x, (carry["h"], carry["c"]))
        loss = F.cross_entropy(logits.view(-1, VOCAB), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        scheduler.step()
        carry.update(h=h.detach(), c=c.detach(), pos=pos + BPTT)
        run.record(loss=loss)
        report_step(step, loss)

    finish(
        out,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "carry": carry,
            "rng": rng_state(("torch",)),
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out")
    args = parser.parse_args()
    train(run_dir=args.run_dir, steps=args.steps, out=args.out)
