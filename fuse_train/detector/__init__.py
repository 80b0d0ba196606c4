"""The dual-stream detector and its mathematics: the network, the loss, box operations, metrics."""
