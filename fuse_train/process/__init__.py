"""The process and its peers: signals however they arrive, the device a command runs on, torch.distributed."""
