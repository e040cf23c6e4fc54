"""The client's clear head, run from ``head.safetensors`` alone (no recipe code).

A head file holds tensors and, in its metadata, a config: the input conversion (uint8 NHWC →
float, normalisation) and a list of ops (``conv2d``, ``hardtanh``, ``avg_pool2d``,
``quantize_dequantize``) over those tensors. Its output is the dequantized quantized tensor that
the FHE circuit takes as input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, config) of a head file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        config = json.loads(handle.metadata()["zoo"])
    return tensors, config


def forward(
    tensors: dict[str, Any], config: dict[str, Any], images_uint8_nhwc: np.ndarray
) -> np.ndarray:
    """Run the head on uint8 images (N, 32, 32, 3); return float32 NCHW circuit inputs."""
    import torch
    import torch.nn.functional as F

    t = tensors
    if config["input"]["to_layout"] != "NCHW":
        raise ValueError(f"unsupported head layout {config['input']['to_layout']!r}")
    x = torch.from_numpy(np.ascontiguousarray(images_uint8_nhwc)).permute(0, 3, 1, 2)
    x = x.to(torch.float32) / 255.0
    mean, std = t["input.mean"].to(torch.float32), t["input.std"].to(torch.float32)
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    with torch.no_grad():
        for op in config["ops"]:
            kind = op["op"]
            if kind == "conv2d":
                x = F.conv2d(x, t[op["weight"]], t[op["bias"]], stride=op["stride"],
                             padding=op["padding"])  # fmt: skip
            elif kind == "hardtanh":
                x = F.hardtanh(x, op["min"], op["max"])
            elif kind == "avg_pool2d":
                x = F.avg_pool2d(x, op["kernel_size"], op["stride"])
            elif kind == "quantize_dequantize":
                bits, signed, narrow = op["bit_width"], op["signed"], op["narrow_range"]
                if signed:
                    qmin, qmax = -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
                else:
                    qmin, qmax = 0, 2**bits - 1 - int(narrow)
                scale, zp = t[op["scale"]], t[op["zero_point"]]
                q = torch.clamp(torch.round(x / scale + zp), qmin, qmax)
                x = (q - zp) * scale
            else:
                raise ValueError(f"unknown head op {kind!r}: this zoo is older than the build")
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)
