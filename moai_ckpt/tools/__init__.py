"""Tools built on moai-ckpt, outside its core: the chaos harness, the demo and its GPT, their commands.

- `chaos`: run a training job with faults on a seeded schedule and judge it against a fault-free run;
- `demo`: kill a rank of a torchrun job mid-step and show the recovered run is the same run;
- `gpt`: the demo's small GPT, a `fault_tolerant` training function (the default chaos job);
- `cli`: ``moai-ckpt chaos`` and ``moai-ckpt demo``.

Nothing in the core (`moai_ckpt.run`, `moai_ckpt.checkpointer` and below) imports this package.
"""
