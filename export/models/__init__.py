"""PyTorch modules, faithful to the official checkpoints, written to trace cleanly to ONNX."""
