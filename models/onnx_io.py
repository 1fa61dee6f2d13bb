"""ONNX for models whose forward returns a dict of tensors: export with a dynamic batch dimension, and an
onnxruntime runner that returns the same dict, so that a predict script runs either backend through one code
path (decoding, letterboxing and outputs stay the script's own).

    export_onnx(model, example, "model.onnx", ["gap", "slider", "offset"], metadata={...})
    outputs = OnnxModel("model.onnx")(image)   # {"gap": tensor, "slider": tensor, "offset": tensor}
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 18        # onnxruntime >= 1.14 runs it; torch's exporter emits 18 natively
MAX_BATCH = 4096  # the exported graph accepts batches of 1 .. MAX_BATCH


class _NamedOutputs(nn.Module):
    """model(x)[name] for each name, as a tuple: ONNX graphs have positional, named outputs, not dicts."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, x):
        out = self.model(x)
        return tuple(out[name] for name in self.names)


def export_onnx(model: nn.Module, example: torch.Tensor, path, output_names: list[str], input_name: str = "input",
                metadata: dict[str, str] | None = None) -> None:
    """Write `model` (put in eval mode, on the CPU, float32) to `path` as ONNX (opset OPSET) with one input
    `input_name` shaped like `example` but any batch size, and the dict entries `output_names` as outputs in
    that order; `metadata` goes to the file's metadata_props (string keys and values, readable by any ONNX
    tool). The file is written as given; callers write to a temporary name and rename."""
    import onnx  # optional dependencies: only exporting needs them

    wrapper = _NamedOutputs(model.cpu().float().eval(), output_names).eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.onnx.export(wrapper, (example.cpu().float(),), input_names=[input_name],
                                output_names=list(output_names), dynamic_shapes={"x": {0: batch}},
                                opset_version=OPSET, dynamo=True, optimize=True, verbose=False)
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def cuda_provider_available() -> bool:
    """Whether the installed onnxruntime can run on CUDA (the onnxruntime-gpu wheel)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxModel:
    """An ONNX file run with onnxruntime, called like the PyTorch model it came from: a float32 (B, ...) tensor
    in, a dict of float32 tensors out (on the CPU). device "cuda" uses onnxruntime's CUDA provider when the
    installed onnxruntime has it. A file that is missing or not an ONNX model raises ValueError naming it."""

    def __init__(self, path, device: str | torch.device = "cpu", threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: ONNX model not found")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda":
            if not cuda_provider_available():
                raise ValueError("the installed onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
        self.path = path
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {self.input_name: np.ascontiguousarray(x.detach().cpu().float().numpy())}
        return {name: torch.from_numpy(value) for name, value in
                zip(self.output_names, self.session.run(self.output_names, feed))}
