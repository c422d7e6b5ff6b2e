"""``python -m moai_ckpt.cli``: the ``moai-ckpt`` command line."""

from moai_ckpt.cli import main

main()
