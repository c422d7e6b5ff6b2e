"""Adapters that bring moai-ckpt to the trainers people already use.

- `moai_ckpt.integrations.lightning`: PyTorch Lightning (`MoaiFaultTolerance`, and `MoaiCheckpointIO`
  from `lightning_io`).
- `moai_ckpt.integrations.tensorboard`: event hooks for TensorBoard and W&B-style loggers
  (`TensorBoardEvents`, `MetricsEvents`; see `moai_ckpt.events`).
- `moai_ckpt.integrations.hf`: Hugging Face `transformers.Trainer` (`MoaiTrainerCallback`) and
  Accelerate (`save_state`, `load_state`, `register_state_hooks`).

Each is imported on its own, so that using one never imports the other framework. The parts they
share live beside them: `data` (a data position that resumes mid-epoch) and `driver` (step log,
replay check and snapshots for a loop that a framework drives).
"""
