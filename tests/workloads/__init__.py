"""Users' workloads and the integrations: the zoo, Lightning, Hugging Face, DCP, safetensors, readers."""
