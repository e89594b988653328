"""Fake-quantized modules used while calibrating: quantizers, wrapped layers, quantized
attention processors and learnable rounding."""
