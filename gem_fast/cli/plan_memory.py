"""Per-GPU peak memory of a gem_fast training step, naive loss vs fused, before renting the GPUs.

    python scripts/plan_memory.py --model llama3-8b --world_size 8 --batch_size 2 --max_length 4096 \
        --activation_checkpointing
    python scripts/plan_memory.py --model llama3-8b --world_size 8 --config configs/llama3_8b_sega_8gpu.yaml
    python scripts/plan_memory.py --model path/to/config.json --device cpu --batch_size 4 --max_length 512

Prints a markdown table: the terms of each loss's peak phase, every phase's total (end of
forward, backward, end of backward, optimizer step, SEGA prefill and decode), the fixed
allowances and whether the peak fits ``--gpu_memory_gib``. The model is an analytic one
(gem_fast/plan/memory.py), checked against measured CPU peaks by ``python -m bench.memory_plan``.

The flags are the training config's (:mod:`gem_fast.config`; ``--micro_batch`` and ``--seq_len``
are older names of ``--batch_size`` and ``--max_length``). SEGA (``--k`` given, or a SEGA YAML):
``--batch_size`` is prompts per rank and ``--max_length`` the prompt length; the step trains
batch_size × k rows of max_length + gen_max_new_tokens tokens and the sampling phase is planned
too. Flags given win over the YAML.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gem_fast.config import TrainConfig, parse_bool, read_yaml
from gem_fast.errors import ArgumentParser, UsageError, add_debug_flag, entry_point, number
from gem_fast.plan.shapes import PRESETS, model_shape

NOT_MODELLED = (
    "Not modelled: allocator fragmentation beyond the fixed allowance, the first step's lazy AdamW "
    "state creation (planned: steady state), Liger/torch.compile variants beyond Liger's RMSNorm and "
    "SwiGLU, non-Llama layer types. The allowances cover what torch's allocator does not see."
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=NOT_MODELLED)
    parser.add_argument("--model", default="llama3-8b",
                        help=f"a preset {sorted(PRESETS)} or an HF config.json (file or folder)")
    parser.add_argument("--config", type=Path, help="training YAML: batch_size, max_length, k, gen_max_new_tokens, "
                                                    "activation_checkpointing, objective")
    parser.add_argument("--world_size", type=number(int, at_least=1), default=1, help="ranks (GPUs); > 1 means FSDP2")
    parser.add_argument("--batch_size", "--micro_batch", dest="batch_size", type=int,
                        help="rows per rank per micro-step (SEGA: prompts)")
    parser.add_argument("--max_length", "--seq_len", dest="max_length", type=int,
                        help="tokens per row (SEGA: prompt tokens)")
    parser.add_argument("--response_len", type=int,
                        help="SFT/DPO: tokens per row the loss scores (default: all; the fused loss skips the rest)")
    parser.add_argument("--loss", choices=("naive", "fused", "both"), default="both")
    parser.add_argument("--activation_checkpointing", type=parse_bool, nargs="?", const=True,
                        help="per-layer activation checkpointing (flag alone: on)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--attention", choices=("flash", "sdpa"),
                        help="default: flash on CUDA (pip install .[flash]), sdpa on the CPU")
    parser.add_argument("--liger_layers", type=parse_bool, help="Liger RMSNorm/SwiGLU (default: on for CUDA)")
    parser.add_argument("--gpu_memory_gib", type=float, default=80.0,
                        help="memory per rank to fit in (GiB; RAM with --device cpu)")
    parser.add_argument("--k", type=int, help="SEGA candidates per prompt")
    parser.add_argument("--gen_max_new_tokens", type=int, help="SEGA tokens generated per candidate")
    parser.add_argument("--objective", choices=("sft", "sega", "dpo", "ipo"), help="default: the YAML's, else sft "
                                                                                    "(sega with --k)")
    parser.add_argument("--prefix_sharing", choices=("auto", "on", "off"),
                        help="SEGA/DPO/IPO: one packed row per prompt unless off (default: the YAML's, else auto)")
    add_debug_flag(parser)
    return parser


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # torch only now that the arguments are known to be good
    from gem_fast.plan.memory import host_load_bytes, markdown_table, plan_memory
    from gem_fast.plan.workload import setup_from_train_config

    config: dict = {}
    if args.config is not None:
        config = read_yaml(args.config)  # UsageError naming the file (and line)
    flags = ("batch_size", "max_length", "k", "objective", "gen_max_new_tokens", "activation_checkpointing",
             "prefix_sharing")
    config.update({key: getattr(args, key) for key in flags if getattr(args, key) is not None})
    losses = ("naive", "fused") if args.loss == "both" else (args.loss,)
    try:
        shape = model_shape(args.model)
        train_config = TrainConfig.from_flat(config)
        plans = {loss: plan_memory(shape, setup_from_train_config(
            train_config, world_size=args.world_size, loss=loss, device=args.device, attention=args.attention,
            liger_layers=args.liger_layers, response_len=args.response_len)) for loss in losses}
    except (KeyError, ValueError) as exc:  # a bad value (named by the message) or an unknown preset
        raise UsageError(str(exc).strip("'\"")) from exc
    setup = next(iter(plans.values())).setup
    print(f"## {shape.name}: {shape.params() / 1e9:.2f} B parameters, V={shape.vocab}, "
          f"{'tied' if shape.tied else 'untied'} embeddings\n")
    print(f"{setup.world_size} × {setup.device}{' (FSDP2)' if setup.sharded else ''}; per rank {setup.micro_batch} rows × "
          f"{setup.seq_len} tokens, {setup.scored} scored; activation checkpointing "
          f"{'on' if setup.activation_checkpointing else 'off'}; attention {setup.attention_kind}; "
          f"Liger layers {'on' if setup.liger else 'off'}")
    if setup.sampling is not None:
        s = setup.sampling
        print(f"SEGA sampling: {s.prompts} prompts × k={s.k}, {s.prompt_len} prompt + {s.new_tokens} new tokens")
    print()
    print(markdown_table(plans, args.gpu_memory_gib))
    print()
    for loss, plan in plans.items():
        verdict = "fits" if plan.total_bytes <= args.gpu_memory_gib * 2**30 else "does NOT fit"
        print(f"{loss}: peak {plan.total_bytes / 2**30:.1f} GiB per rank ({plan.peak_phase.name}), "
              f"{verdict} in {args.gpu_memory_gib:g} GiB")
    host = {init: host_load_bytes(shape, world_size=args.world_size, init=init, device=args.device) / 2**30
            for init in ("meta", "full")}
    print(f"host memory per rank while loading (bf16 safetensors): --init meta {host['meta']:.1f} GiB, "
          f"--init full {host['full']:.1f} GiB")
    print(f"\n{NOT_MODELLED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
