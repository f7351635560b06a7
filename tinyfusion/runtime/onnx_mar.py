"""A MAR in ONNX: two graphs and the loop around them.

`mar_z.onnx` is the encoder and decoder (tokens, mask, labels -> z for every position), exported from
MAR.predict_z_static so the shapes are static but for the batch; `mar_head.onnx` is the diffusion head
(x, t, c = z -> eps and variance values) for any number of tokens. The unmasking loop, CFG and the head's
DDPM steps stay in Python (MAR.sample) and call the graphs through onnxruntime, so
`runtime.load(mar, "onnxruntime")` (hence `sample`/`evaluate --backend onnxruntime`) runs a MAR.
"""
import copy
import logging
import os
import warnings

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError
from .onnx_common import check_parity, compare, graph_sha256, ort_session, write_parity

Z_GRAPH, HEAD_GRAPH = "mar_z.onnx", "mar_head.onnx"


class ConditionGraph(nn.Module):
    """The exported encoder-decoder: (tokens, mask, labels) -> the head's condition z per token, with the
    static-shape masking (predict_z_static) a graph needs."""

    def __init__(self, mar):
        super().__init__()
        self.mar = mar

    def forward(self, tokens, mask, labels):
        return self.mar.predict_z_static(tokens, mask, labels)


def example_inputs(mar, batch, seed=0):
    """Tokens, a random mask (70% of positions, as in generation the same count per sample) and labels
    (the null label included), then head rows."""
    g = torch.Generator().manual_seed(seed)
    c = mar.config
    tokens = torch.randn(batch, mar.seq_len, mar.token_embed_dim, generator=g)
    order = torch.argsort(torch.rand(batch, mar.seq_len, generator=g), dim=1)
    mask = torch.zeros(batch, mar.seq_len, dtype=torch.bool).scatter_(1, order[:, :int(0.7 * mar.seq_len)], True)
    labels = torch.randint(0, c.class_num + 1, (batch,), generator=g)
    n = 3 * batch  # head rows
    head = (torch.randn(n, mar.token_embed_dim, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, c.decoder_embed_dim, generator=g))
    return (tokens, mask, labels), head


def _export(module, inputs, names, shapes, path, opset):
    tmp = f"{path}.tmp{os.getpid()}"
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, inputs, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                                    input_names=names, output_names=["out"], verbose=False)
        program.save(tmp)
    os.replace(tmp, path)
    return path


def export_mar(model, out_dir, opset=18):
    """Write out_dir/mar_z.onnx and out_dir/mar_head.onnx (fp32, batch and head rows dynamic)."""
    model = copy.deepcopy(model).float().cpu().eval()
    os.makedirs(out_dir, exist_ok=True)
    z_inputs, head_inputs = example_inputs(model, batch=2)
    b, n = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("rows", min=1, max=1 << 20)
    z_path = _export(ConditionGraph(model), z_inputs, ["tokens", "mask", "labels"],
                     {"tokens": {0: b}, "mask": {0: b}, "labels": {0: b}}, os.path.join(out_dir, Z_GRAPH), opset)
    head_path = _export(model.diffloss.net, head_inputs, ["x", "t", "c"], {"x": {0: n}, "t": {0: n}, "c": {0: n}},
                        os.path.join(out_dir, HEAD_GRAPH), opset)
    return z_path, head_path


class _OrtHead(nn.Module):
    """The head's call (x, t, z) -> output through an ORT session; MAR's sampler reads in_channels."""

    def __init__(self, session, in_channels):
        super().__init__()
        self.session, self.in_channels = session, in_channels

    def forward(self, x, t, z):
        feeds = {"x": x.float().cpu().numpy(), "t": t.long().cpu().numpy(), "c": z.float().cpu().numpy()}
        return torch.from_numpy(self.session.run(None, feeds)[0])


def onnx_mar(model, folder, threads=None):
    """A copy of `model` whose encoder-decoder and head run the graphs in `folder` through onnxruntime."""
    z_session = ort_session(os.path.join(folder, Z_GRAPH), threads)
    head_session = ort_session(os.path.join(folder, HEAD_GRAPH), threads)
    rt = copy.deepcopy(model).float().cpu().eval()

    def predict_z(tokens, mask, labels, drop=None):
        if drop is not None:
            labels = torch.where(drop == 1, torch.full_like(labels, model.config.class_num), labels)
        feeds = {"tokens": tokens.float().cpu().numpy(), "mask": mask.cpu().numpy().astype(np.bool_),
                 "labels": labels.long().cpu().numpy()}
        return torch.from_numpy(z_session.run(None, feeds)[0])

    rt.predict_z = predict_z
    rt.diffloss.net = _OrtHead(head_session, model.diffloss.net.in_channels)
    rt.backend = "onnxruntime"
    return rt


def mar_parity(model, folder, batches=(2, 5)):
    """Each graph against PyTorch at each batch size, then a short guided generation end to end (its error
    relative to the largest token when that exceeds 1)."""
    model = model.float().cpu().eval()
    rt = onnx_mar(model, folder)
    report = {}
    for batch in batches:
        (tokens, mask, labels), (x, t, z) = example_inputs(model, batch, seed=batch)
        with torch.no_grad():
            report[f"z_batch{batch}"] = compare(rt.predict_z(tokens, mask, labels), model.predict_z(tokens, mask, labels))
            report[f"head_rows{3 * batch}"] = compare(rt.diffloss.net(x, t, z), model.diffloss.net(x, t, z))
    labels = torch.arange(2) % model.config.class_num
    with torch.no_grad():
        got = rt.sample(labels, num_iter=4, cfg=1.5, head_steps=10, seed=0)
        want = model.sample(labels, num_iter=4, cfg=1.5, head_steps=10, seed=0)
    # relative to the largest token value: an unclipped head amplifies float noise with the tokens (MARConfig)
    scale = max(1.0, want.abs().max().item())
    report["sample"] = compare(got / scale, want / scale)
    return report


def export_mar_and_verify(model, out_dir, opset, thresholds, log=print):
    """Both graphs, parity.json, and a UserError (graphs renamed *.rejected) when parity is off."""

    log(f"exporting a {model.config.encoder_depth}+{model.config.decoder_depth}-block MAR to {out_dir} (opset {opset})")
    paths = export_mar(model, out_dir, opset)
    report = {"onnx": [os.path.basename(p) for p in paths], "sha256": [graph_sha256(p) for p in paths], "opset": opset,
              "precision": "fp32", "thresholds": dict(zip(("max_abs", "mean_abs", "min_cosine"), thresholds)),
              "parity": {"onnxruntime": mar_parity(model, out_dir)}}
    write_parity(out_dir, report)
    bad = check_parity(report["parity"], thresholds)
    if bad:
        for p in paths:
            os.replace(p, p + ".rejected")
        raise UserError(f"parity above the thresholds ({'; '.join(bad)}); see {out_dir}/parity.json")
    return report
