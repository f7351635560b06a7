"""A memory model of one training GPU under DDP and FSDP: bytes of parameters, gradients, AdamW state, EMA,
a KD teacher and activations, from a model's parameter shapes (built on the meta device: nothing loaded).

The terms, per GPU, K ranks, each tensor sharded on dim 0 as FSDP2 does (padded to a multiple of K):
- parameters: fp32 master weights of the trained model (the search's frozen base included);
- gradients: fp32, of the trainable tensors; optimizer: AdamW's two fp32 moments of them;
- EMA: fp32, of what the task averages (train/finetune: the model; the search: its update and gates);
- teacher (finetune): its fp32 weights, sharded or whole on every rank;
- working set: FSDP gathers a unit (one block) at a time and prefetches the next: two blocks whole in the
  compute dtype; DDP holds an autocast copy of every weight in the compute dtype;
- activations: Korthikanti et al.'s 34 bytes x tokens x batch x hidden per transformer layer at 16 bits
  (flash attention: no score matrix), doubled in fp32; with --grad-checkpoint one block input per layer
  plus one block's full set.
"""
import math

import torch

ACT_UNITS = 17  # elements per token per hidden unit per layer (34 bytes at 2 bytes each)


def _numel(shape, world=1):
    """Elements of one tensor on one rank: dim 0 padded to a multiple of `world` and split."""
    if not shape:
        return 1
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / world) * rest


def _sum(shapes, world=1):
    return sum(_numel(s, world) for s in shapes)


def lora_shapes(targets, rank):
    """The search's LoRA update: A (rank, in) and B (out, rank) per nn.Linear of the adapter's targets."""
    out = []
    for t in targets:
        for m in t.modules():
            if isinstance(m, torch.nn.Linear):
                out += [(rank, m.in_features), (m.out_features, rank)]
    return out


def estimate(model, task="finetune", world=8, batch=1, tokens=256, hidden=None, precision="bf16",
             grad_checkpoint=False, keep=0.5, lora_rank=8, teacher="shard"):
    """{"ddp": {term: bytes}, "fsdp": {term: bytes}} per GPU. `model`: the full (source) model, possibly on
    the meta device; `task` train, search or finetune (a student keeping `keep` of the blocks, taught by the
    full model). `batch` is per GPU, `tokens` per sample; `hidden` defaults to the widest square weight."""
    from ..models.stack import block_stack

    stack = block_stack(model)
    blocks = stack.blocks
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    other = [tuple(p.shape) for p in model.parameters() if id(p) not in in_blocks]
    frozen = [tuple(p.shape) for p in model.parameters() if not p.requires_grad]  # in memory, never trained
    per_block = [[tuple(p.shape) for p in b.parameters()] for b in blocks]
    block_shapes = [s for b in per_block for s in b]
    kept = max(1, round(len(blocks) * keep)) if task == "finetune" else len(blocks)
    fraction = kept / len(blocks)  # Flux's blocks differ in size: the student's share is the average
    compute = {"bf16": 2, "fp16": 2, "fp32": 4}[precision]
    hidden = hidden or max(s[0] for s in block_shapes if len(s) == 2 and s[0] == s[1])
    per_layer = ACT_UNITS * tokens * batch * hidden * compute
    acts = kept * tokens * batch * hidden * compute + per_layer if grad_checkpoint else kept * per_layer
    biggest = max(_sum(b) for b in per_block)

    out = {}
    for mode, k in (("ddp", 1), ("fsdp", world)):
        trained = _sum(other, k) + _sum(block_shapes, k) * fraction  # the student, or the whole model
        trainable = _sum(lora_shapes(stack.lora_targets(), lora_rank), k) if task == "search" else trained - _sum(frozen, k)
        if mode == "fsdp":
            working = 2 * biggest * compute  # one block gathered, the next prefetched
        else:  # autocast keeps a 16-bit copy of every weight it casts
            working = (_sum(other) + _sum(block_shapes) * fraction) * compute if compute == 2 else 0
        terms = {"parameters": 4 * trained, "gradients": 4 * trainable, "optimizer": 8 * trainable,
                 "ema": 4 * (trainable if task == "search" else trained), "working set": working, "activations": acts}
        if task == "finetune":
            whole = mode == "ddp" or teacher == "replicate"
            terms["teacher"] = 4 * (_sum(other, 1 if whole else k) + _sum(block_shapes, 1 if whole else k))
        out[mode] = {name: int(v) for name, v in terms.items()}
    return out
