"""Quantization recipes, TensorRT build plans and builder, ONNX lint for TensorRT."""
