"""Workstation side: PyTorch definitions of every part, checkpoint loaders, ONNX export, parity."""
