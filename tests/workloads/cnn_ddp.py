"""Image classification: a small CNN with BatchNorm and dropout, DDP on 2 ranks.

Augmentation draws from numpy's and Python's global RNGs, gradients accumulate over 2
micro-batches, the learning rate follows OneCycleLR.

    torchrun --nproc-per-node 2 cnn_ddp.py --run-dir runs/cnn --steps 30
"""

import argparse
import os
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from zoo_result import finish, report_step, rng_state

import moai_ckpt

GLOBAL_BATCH = 32
ACCUM = 2


class ConvNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.b2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        return self.fc(self.drop(torch.flatten(x, 1)))


def make_data(n=512):
    g = torch.Generator().manual_seed(1234)
    images = torch.randn(n, 3, 16, 16, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels


def augment(img):
    if random.random() < 0.5:
        img = img.flip(-1)
    dy, dx = np.random.randint(-2, 3, size=2)
    img = torch.roll(img, shifts=(int(dy), int(dx)), dims=(-2, -1))
    return img + torch.from_numpy(np.random.normal(0.0, 0.05, img.shape).astype(np.float32))


@moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=7)
def train(run, run_dir, steps=30, out=None):
    torch.manual_seed(0)
    np.random.seed(100 + run.rank)
    random.seed(200 + run.rank)
    images, labels = make_data()
    device = run.device  # cuda:<local rank> on a GPU machine, else the CPU

    model = DDP(ConvNet().to(device))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    run.track(model=model, optim=opt, sched=sched)
    sampler = run.sampler(len(images), GLOBAL_BATCH, seed=0)

    for step in run.steps(steps):
        run.hparam(accumulation=ACCUM)
        idx = run.batch()
        x = torch.stack([augment(images[i]) for i in idx]).to(device)
        y = labels[idx].to(device)
        model.train()
        opt.zero_grad()
        total = 0.0
        for k, (xs, ys) in enumerate(zip(x.chunk(ACCUM), y.chunk(ACCUM), strict=True)):
            last = k == ACCUM - 1
            ctx = model.no_sync() if not last else torch.enable_grad()
            with ctx:
                loss = F.cross_entropy(model(xs), ys) / ACCUM
                loss.backward()
            total += loss.item()
        opt.step()
        sched.step()
        run.record(loss=total)
        report_step(step, total)

    finish(
        out,
        {
            "model": model.state_dict(),
            "optim": opt.state_dict(),
            "sched": sched.state_dict(),
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
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.backends.cudnn.deterministic = True  # reproducible convolutions
        torch.backends.cudnn.benchmark = False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    train(run_dir=args.run_dir, steps=args.steps, out=args.out)
    dist.destroy_process_group()
