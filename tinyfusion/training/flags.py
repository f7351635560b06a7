"""The run flags every trainer shares (`train`, `prune`, `finetune`), and the RunOptions they make."""
from ..errors import positive
from .engine import RunOptions


def add_engine_args(parser):
    g = parser.add_argument_group("execution (GPU: bf16 autocast by default)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast dtype over fp32 master weights, EMA and optimizer state; auto = bf16 on CUDA, "
                        "fp32 on the CPU; fp16 adds a dynamic loss scaler")
    g.add_argument("--no-tf32", action="store_true", help="fp32 matmuls without TF32 tensor cores on CUDA")
    g.add_argument("--grad-accum", type=positive(), default=1,
                   help="split each step's batch into this many micro-batches (same result, less activation memory)")
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute each block's activations in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile every block (one graph per block shape)")
    g.add_argument("--ckpt-minutes", type=float, default=30.0,
                   help="also save the resumable state after this many minutes since the last save (0: steps only)")
    return g


def engine_config(args):
    return RunOptions(precision=args.precision, tf32=not args.no_tf32, grad_accum=args.grad_accum,
                      grad_checkpoint=args.grad_checkpoint, compile=args.compile, ckpt_minutes=args.ckpt_minutes)
