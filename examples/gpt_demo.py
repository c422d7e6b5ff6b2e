"""The demo's small GPT, trained under `moai_ckpt.fault_tolerant` (it ships as `moai_ckpt.tools.gpt`).

    torchrun --standalone --nproc-per-node 2 examples/gpt_demo.py --storage runs/gpt --steps 60 --result out.json
    python examples/gpt_demo.py --storage runs/gpt --steps 60          # one process

See `moai_ckpt.tools.gpt` for the model, the corpus and the options; run.json names the training
function as ``moai_ckpt.tools.gpt:train``.
"""

from moai_ckpt.tools.gpt import main

if __name__ == "__main__":
    main()
