"""The run flags every trainer shares (`train`, `prune`, `finetune`), and the RunOptions they make."""
from ..errors import UserError, positive
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
    f = parser.add_argument_group("FSDP (models past one GPU; under torchrun, or one process to measure its memory)")
    f.add_argument("--fsdp", action="store_true",
                   help="shard every transformer block and the rest of the model over the ranks (FSDP2) instead of DDP; "
                        "resumable states become one folder of per-rank shards")
    f.add_argument("--fsdp-offload", action="store_true", help="keep parameters and optimizer state on the host (CUDA)")
    f.add_argument("--fsdp-teacher", choices=["shard", "replicate"], default="shard",
                   help="the Masked-KD teacher: sharded like the student, or whole on every rank when it fits")
    return g


def engine_config(args):
    if (args.fsdp_offload or args.fsdp_teacher != "shard") and not args.fsdp:
        raise UserError("--fsdp-offload and --fsdp-teacher apply with --fsdp")
    return RunOptions(precision=args.precision, tf32=not args.no_tf32, grad_accum=args.grad_accum,
                      grad_checkpoint=args.grad_checkpoint, compile=args.compile, ckpt_minutes=args.ckpt_minutes,
                      fsdp=args.fsdp, fsdp_offload=args.fsdp_offload, fsdp_teacher=args.fsdp_teacher)
