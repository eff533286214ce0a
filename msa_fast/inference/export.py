"""Exported graphs of a model: ONNX (:func:`export_onnx`) and AOTInductor (:func:`export_aoti`),
for programs that run without ``msa_fast`` (ONNX Runtime, C++), and for the Predictor's
``runtime="onnxruntime" | "aoti"``.

**The graph's inputs** (:data:`INPUT_NAMES`, in this order): ``text (B, Lt, 768)`` float32 (or
``text_bert (B, 3, Lt)`` int64 for BERT-input models), ``audio (B, La, da)``, ``vision (B, Lv,
dv)`` float32, ``text_mask (B, Lt)``, ``audio_mask (B, La)``, ``vision_mask (B, Lv)`` bool with
**True = padding**, ``present (B, 3)`` bool (False = the modality is missing: zeros, as the drop
protocol makes them). Output ``pred (B,)`` float32. Every row needs at least one valid step per
modality (a missing one: valid zeros).

**One graph, dynamic shapes.** Batch and lengths are symbolic (``torch.export`` dynamic
shapes). The LSTM encoders export as ONNX ``LSTM`` nodes through the registered op
:func:`msa_fast.ops.lstm.lstm` (``aten.lstm`` would be unrolled per step with its length
fixed). Aligned and unaligned data are two graphs: a model may read equal lengths as aligned
data (FD-CMDIE's global feature), so an ``aligned`` export has one length ``L`` for all three
modalities (``Lt = La = Lv``) and an unaligned one three free lengths.

**One graph for every length.** Measured for AGFN at batch 1 on MOSI aligned (ONNX Runtime,
1 thread): the dynamic graph 0.347 / 0.356 ms p50, one exported at the bucket's fixed shape
0.362 / 0.360 ms, so there is no graph per bucket. The Predictor also builds the variant
without ``present`` (``present=False``) for buckets whose rows have every modality.

**AOTInductor and the LSTM op.** The package calls ``msa_fast::lstm`` by name (ATen's LSTM
would fix every length in the graph), so a loader registers that op first: ``msa-fast export
--format aoti`` writes ``<out>.ops.py`` beside the package, a copy of
:mod:`msa_fast.ops.lstm` that imports torch alone (``runpy.run_path(out + ".ops.py")``).
A C++ loader needs the same op registered (a ``TORCH_LIBRARY`` wrapping ``at::lstm``), which we
do not ship yet.

**Metadata** (ONNX ``metadata_props``; AOTInductor: ``get_metadata()`` of the loaded package;
both also in ``<out>.json``): ``msa_fast.model``, ``msa_fast.dims`` (JSON), ``msa_fast.inputs``
(the order above), ``msa_fast.modalities`` ("text,audio,vision"), ``msa_fast.mask``
("True = padding"), ``msa_fast.aligned``, ``msa_fast.length_buckets`` (the Predictor's;
any length runs, the buckets are what the Predictor pads to).

**Checked.** Every export is run against the eager model (the Predictor's copy) on random
inputs of several batches and lengths, rows with padding and with a missing modality, and on
the caller's real inputs when given; a difference above ``tol`` (1e-5, absolute and relative
to the output's scale) raises :class:`ExportError` naming the input and the difference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from msa_fast import _backend

MODALITIES = ("text", "audio", "vision")
# the file that registers ``msa_fast::lstm`` with torch alone (no other import): an AOTInductor
# package calls the op by name, so a loader runs this file first (``msa-fast export`` copies it
# beside the package as ``<out>.ops.py``)
LSTM_OP_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ops", "lstm.py")


def input_names(dims: Mapping, present: bool = True) -> tuple[str, ...]:
    """The graph's inputs in order; ``present=False``: the variant without ``present`` (every
    modality present), whose graph skips the masking of missing modalities."""
    text = "text_bert" if dims.get("text_input", "features") == "bert" else "text"
    names = (text, "audio", "vision", "text_mask", "audio_mask", "vision_mask", "present")
    return names if present else names[:-1]


INPUT_NAMES = input_names({})


class ExportError(ValueError):
    """The exported graph disagrees with the eager model, or the model cannot be exported."""


class ExportForward(nn.Module):
    """A model (the Predictor's copy: eval, unpacked LSTMs) as a function of plain tensors in
    :data:`INPUT_NAMES` order, returning ``pred (B,)`` float32."""

    def __init__(self, model: nn.Module, dims: Mapping, aligned: bool | None = None):
        super().__init__()
        self.model = model
        self.text_key = input_names(dims)[0]
        self.aligned = aligned

    def forward(self, text, audio, vision, text_mask, audio_mask, vision_mask, present=None):
        batch = {self.text_key: text, "audio": audio, "vision": vision}
        if self.aligned is not None:  # the layout, as the Predictor passes it
            batch["aligned"] = self.aligned
        if present is not None:
            batch["present"] = present
        for m, mask in zip(MODALITIES, (text_mask, audio_mask, vision_mask)):
            batch[f"{m}_mask"] = mask
            batch[f"{m}_lengths"] = (~mask).sum(1)
        return self.model(batch)["pred"].float()


def example_inputs(dims: Mapping, B: int, lengths: Sequence[int], *, seed: int = 0,
                   pad_rows: bool = True) -> tuple[torch.Tensor, ...]:
    """Random inputs in :data:`INPUT_NAMES` order: ``lengths`` = (Lt, La, Lv); with
    ``pad_rows`` the last row is shorter (padded) and, for B >= 3, the second misses audio."""
    g = torch.Generator().manual_seed(seed)
    bert = dims.get("text_input", "features") == "bert"
    out, masks = [], []
    for m, L in zip(MODALITIES, lengths):
        if m == "text" and bert:
            ids = torch.randint(1000, 2000, (B, 3, L), generator=g)
            ids[:, 1] = 1
            ids[:, 2] = 0
            out.append(ids)
        else:
            out.append(torch.randn(B, L, int(dims[m]), generator=g))
        mask = torch.zeros(B, L, dtype=torch.bool)
        if pad_rows and B >= 2 and L >= 2:
            mask[-1, max(1, L // 2):] = True
        masks.append(mask)
    present = torch.ones(B, 3, dtype=torch.bool)
    if pad_rows and B >= 3:
        present[1, 1] = False
        out[1][1].zero_()
    return (*out, *masks, present)


def metadata(model_name: str, dims: Mapping, aligned: bool, length_buckets: Sequence[int],
             present: bool = True) -> dict:
    return {"msa_fast.model": model_name, "msa_fast.dims": json.dumps(dict(dims), sort_keys=True),
            "msa_fast.inputs": ",".join(input_names(dims, present)), "msa_fast.modalities": ",".join(MODALITIES),
            "msa_fast.mask": "True = padding", "msa_fast.aligned": str(bool(aligned)).lower(),
            "msa_fast.length_buckets": ",".join(str(b) for b in length_buckets), "msa_fast.output": "pred (B,)"}


def _dynamic_shapes(dims: Mapping, aligned: bool, present: bool = True) -> dict:
    from torch.export import Dim

    B = Dim("batch", min=1, max=4096)
    if aligned:
        Lt = La = Lv = Dim("L", min=1, max=8192)
    else:
        Lt, La, Lv = (Dim(n, min=1, max=8192) for n in ("Lt", "La", "Lv"))
    seq = {"text": Lt, "audio": La, "vision": Lv}
    shapes = {}
    for m in MODALITIES:
        bert = m == "text" and dims.get("text_input", "features") == "bert"
        shapes[m] = {0: B, 2 if bert else 1: seq[m]}  # text_bert: (B, 3, Lt)
        shapes[f"{m}_mask"] = {0: B, 1: seq[m]}
    if present:
        shapes["present"] = {0: B}
    return shapes


def _trace_inputs(dims: Mapping, aligned: bool, present: bool = True) -> tuple[torch.Tensor, ...]:
    # distinct sizes > 1 so that no symbol is specialised (0/1) or tied to another by accident
    return example_inputs(dims, 3, (23, 23, 23) if aligned else (23, 29, 31), seed=1)[:7 if present else 6]


def _check_cases(dims: Mapping, aligned: bool, real: Sequence[tuple] | None, present: bool = True):
    shapes = [(1, (50, 50, 50)), (4, (8, 8, 8)), (2, (64, 64, 64))] if aligned else \
        [(1, (50, 375, 500)), (4, (8, 16, 12)), (2, (50, 60, 70))]  # unaligned: lengths differ
    n = 7 if present else 6
    for i, (B, L) in enumerate(shapes):
        yield f"random batch {B}, lengths {L}", example_inputs(dims, B, L, seed=10 + i)[:n]
    for j, inputs in enumerate(real or ()):
        yield f"real input {j} (batch {inputs[0].shape[0]})", tuple(inputs)[:n]


def verify(run, forward: nn.Module, dims: Mapping, aligned: bool, *, real: Sequence[tuple] | None = None,
           tol: float = 1e-5, present: bool = True) -> float:
    """Compare ``run(*inputs) -> (B,) array`` with ``forward`` (eager); returns the largest
    difference, raises :class:`ExportError` above ``tol`` (abs + tol * max |eager|)."""
    worst = 0.0
    with torch.inference_mode():
        for what, inputs in _check_cases(dims, aligned, real, present):
            want = forward(*inputs).numpy()
            got = np.asarray(run(*inputs), dtype=np.float32).reshape(-1)
            if got.shape != want.shape:
                raise ExportError(f"export: {what}: the exported graph returned shape {got.shape}, "
                                  f"eager {want.shape}")
            diff = float(np.max(np.abs(got - want))) if want.size else 0.0
            if not np.isfinite(got).all() or diff > tol * (1.0 + float(np.max(np.abs(want)))):
                raise ExportError(f"export: {what}: the exported graph differs from eager by {diff:.3g} "
                                  f"(tolerance {tol:g}); refusing to write it")
            worst = max(worst, diff)
    return worst


def onnx_program(forward: ExportForward, dims: Mapping, aligned: bool, present: bool = True):
    """``torch.onnx.export`` (dynamo) of ``forward``: an ``ONNXProgram``."""
    from msa_fast.ops.lstm import onnx_translations

    try:
        import onnxscript  # noqa: F401
    except ImportError as e:  # pragma: no cover - the [onnx] extra
        raise ExportError("export: ONNX export needs onnx and onnxscript: pip install 'msa_fast[onnx]'") from e
    names = input_names(dims, present)
    shapes = _dynamic_shapes(dims, aligned, present)
    try:
        with _backend.exporting():
            return torch.onnx.export(forward, _trace_inputs(dims, aligned, present), dynamo=True,
                                     dynamic_shapes=shapes, input_names=list(names), output_names=["pred"],
                                     verbose=False, custom_translation_table=onnx_translations())
    except Exception as e:  # noqa: BLE001 - say what failed, in one line
        raise ExportError(f"export: torch.onnx.export failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _name_axes(proto, dims: Mapping, aligned: bool):
    """The inputs' symbolic axes named ``batch`` and ``L`` (aligned) or ``Lt, La, Lv``, and the
    intermediate shape annotations dropped. torch.onnx names axes by matching the symbols'
    constraints, and three lengths of one range came out with swapped names (audio's axis
    called ``Lt``), which ONNX Runtime's buffer planner then trusted; it infers the
    intermediate shapes itself."""
    seq = dict.fromkeys(MODALITIES, "L") if aligned else {"text": "Lt", "audio": "La", "vision": "Lv"}
    bert = dims.get("text_input", "features") == "bert"
    for inp in proto.graph.input:
        m = inp.name.removesuffix("_mask").removesuffix("_bert")
        axes = {0: "batch"}
        if m in seq:
            axes[2 if (inp.name == "text_bert" and bert) else 1] = seq[m]
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if i in axes:
                d.dim_param = axes[i]
    for out in proto.graph.output:
        out.type.tensor_type.shape.dim[0].dim_param = "batch"
    del proto.graph.value_info[:]
    return proto


def ort_session(model_bytes: bytes | str, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on the CPU, ``ORT_ENABLE_ALL``, ``threads`` intra-op
    threads (default: torch's)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def ort_runner(session, names: Sequence[str]):
    def run(*inputs):
        return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
    return run


def export_onnx(model: nn.Module, dims: Mapping, *, model_name: str, aligned: bool,
                length_buckets: Sequence[int], real: Sequence[tuple] | None = None,
                present: bool = True) -> tuple[bytes, dict]:
    """The checked ONNX file of ``model`` (the Predictor's copy) as bytes, with its metadata;
    ``present=False``: the graph without the ``present`` input (every modality present)."""
    import onnx

    forward = ExportForward(model, dims, aligned).eval()
    proto = _name_axes(onnx_program(forward, dims, aligned, present).model_proto, dims, aligned)
    meta = metadata(model_name, dims, aligned, length_buckets, present)
    onnx.helper.set_model_props(proto, meta)
    data = proto.SerializeToString()
    diff = verify(ort_runner(ort_session(data), input_names(dims, present)), forward, dims, aligned,
                  real=real, present=present)
    meta["msa_fast.checked_max_abs_diff"] = f"{diff:.3g}"
    return data, meta


def export_aoti(model: nn.Module, dims: Mapping, path: str, *, model_name: str, aligned: bool,
                length_buckets: Sequence[int], real: Sequence[tuple] | None = None) -> dict:
    """An AOTInductor package at ``path`` (``.pt2``; ``torch._inductor.aoti_load_package``
    loads it, in Python or C++), checked against eager; returns its metadata."""
    forward = ExportForward(model, dims, aligned).eval()
    meta = metadata(model_name, dims, aligned, length_buckets)
    try:
        with _backend.exporting():
            ep = torch.export.export(forward, _trace_inputs(dims, aligned), dynamic_shapes=_dynamic_shapes(dims, aligned))
        torch._inductor.aoti_compile_and_package(ep, package_path=path,
                                                 inductor_configs={"aot_inductor.metadata": meta})
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"export: AOTInductor failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    loaded = torch._inductor.aoti_load_package(path)
    try:
        diff = verify(lambda *a: loaded(*a).numpy(), forward, dims, aligned, real=real)
    except ExportError:
        os.unlink(path)
        raise
    meta["msa_fast.checked_max_abs_diff"] = f"{diff:.3g}"
    return meta


__all__ = ["INPUT_NAMES", "ExportError", "ExportForward", "example_inputs", "export_aoti", "export_onnx",
           "input_names", "metadata", "ort_session", "verify"]
