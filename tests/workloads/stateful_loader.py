"""Classification fed by torchdata's StatefulDataLoader: 2 worker processes, shuffled every epoch,
with random augmentation in the workers. The loader itself is tracked: its state (sampler
position, each worker's dataset state) is in every snapshot.

    python stateful_loader.py --run-dir runs/loader --steps 30
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from zoo_result import finish, report_step, rng_state

import moai_ckpt


class NoisyBlobs(Dataset):
    """Points around 4 centres; each read adds fresh noise (augmentation in the worker).

    The noise comes from the dataset's own generator, seeded per worker, and the dataset is
    Stateful: StatefulDataLoader saves each worker's generator with the loader's state, so a
    resumed loader goes on with the same noise.
    """

    def __init__(self, n=320):
        g = torch.Generator().manual_seed(31)
        self.centres = torch.randn(4, 16, generator=g) * 2
        self.labels = torch.randint(0, 4, (n,), generator=g)
        self.base = self.centres[self.labels] + torch.randn(n, 16, generator=g)
        self.rng = torch.Generator().manual_seed(0)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.base[i] + 0.1 * torch.randn(16, generator=self.rng), self.labels[i]

    def state_dict(self):
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state):
        self.rng.set_state(state["rng"])


def seed_worker(worker_id):
    info = get_worker_info()
    info.dataset.rng.manual_seed(info.seed)


def forever(loader):
    while True:
        yield from loader


@moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=7)
def train(run, run_dir, steps=30, out=None):
    torch.manual_seed(13)
    loader = StatefulDataLoader(
        NoisyBlobs(),
        batch_size=16,
        shuffle=True,
        num_workers=2,
        drop_last=True,
        generator=torch.Generator().manual_seed(8),
        worker_init_fn=seed_worker,
    )
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run.track(model=model, optimizer=optimizer, loader=loader)

    batches = forever(loader)
    for step in run.steps(steps):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.record(loss=loss)
        report_step(step, loss)

    finish(
        out,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "loader": loader.state_dict(),
            "rng": rng_state(("torch",)),
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out")
    args = parser.parse_args()
    train(run_dir=args.run_dir, steps=args.steps, out=args.out)
