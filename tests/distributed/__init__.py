"""Distributed saves and restores over real gloo (and NCCL) process groups."""
