"""Everything that touches files: atomic writes and input checks, safetensors, saving and
loading quantized models, checkpoints, and the torchao export."""
