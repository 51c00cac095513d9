"""Inspect a rotary plan: frequencies, wavelengths, critical dimension and feature gap.

    python tools/rope_report.py --kind resonance_yarn --head-dim 128 --base 10000 \
        --original-max-position 4096 --factor 8 [--json] [--plot rope.png]
"""

from __future__ import annotations

import json
import math
import sys

from megatron_resonance.cli import ArgumentParser, guard
from megatron_resonance.errors import UserError
from megatron_resonance.rope.diagnostics import RopeReport, report
from megatron_resonance.rope.frequencies import KINDS, RopeConfig, compute_frequencies

# matplotlib (about a second to import) is imported where the figure is drawn.

PROG = "rope_report.py"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="rope", help=f"one of: {', '.join(KINDS)}")
    p.add_argument("--head-dim", type=int, default=128, help="rotary head dimension d")
    p.add_argument("--base", type=float, default=10000.0, help="rotary base b (rope_theta)")
    p.add_argument("--original-max-position", type=int, default=4096, help="training length L")
    p.add_argument("--factor", type=float, default=1.0, help="scale s = target length / L")
    p.add_argument("--beta-fast", type=float, default=32.0, help="YaRN beta_fast")
    p.add_argument("--beta-slow", type=float, default=1.0, help="YaRN beta_slow")
    p.add_argument("--resonance", action="store_true", help="round wavelengths on top of any --kind")
    p.add_argument(
        "--target-max-position",
        type=int,
        default=None,
        help="test length L' for the feature gap (default L*s, or 2L when s = 1)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--plot", metavar="FILE.png", help="write wavelength and feature-gap plot")
    return p


def format_table(r: RopeReport) -> str:
    L = r.original_max_position
    lines = [
        f"kind={r.kind} head_dim={r.head_dim} base={r.base:g} factor={r.factor:g} L={L} L'={r.target_max_position}",
        f"attention_factor={r.attention_factor:.6f} (attention logits x {r.attention_factor**2:.6f})",
        f"pre-critical features (wavelength < L): {r.pre_critical} of {len(r.inv_freq)}; "
        f"critical dim: {r.critical_dim}",
        f"max feature gap over pre-critical features: {r.max_feature_gap_pre_critical:.3e} rad",
        "",
        f"{'i':>3}  {'inv_freq':>14}  {'wavelength':>14}  {'pre-crit':>8}  {'feature_gap':>11}",
    ]
    for i, (f, w, g) in enumerate(zip(r.inv_freq, r.wavelengths, r.feature_gap)):
        lines.append(f"{i:>3}  {f:>14.8e}  {w:>14.4f}  {'yes' if w < L else 'no':>8}  {g:>11.3e}")
    return "\n".join(lines)


def write_plot(r: RopeReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    idx = range(len(r.wavelengths))
    ax1.semilogy(idx, r.wavelengths, ".-")
    ax1.axhline(r.original_max_position, color="r", ls="--", label=f"L = {r.original_max_position}")
    ax1.axvline(r.critical_dim - 0.5, color="gray", ls=":", label=f"critical dim = {r.critical_dim}")
    ax1.set_ylabel("wavelength (positions)")
    ax1.legend()
    ax1.set_title(f"{r.kind}: d={r.head_dim}, b={r.base:g}, s={r.factor:g}")
    ax2.plot(idx, r.feature_gap, ".-")
    ax2.set_ylabel(f"feature gap (rad), L'={r.target_max_position}")
    ax2.set_xlabel("feature i")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with guard(PROG):
        if args.kind not in KINDS:
            raise UserError(f"unknown --kind {args.kind!r} (expected one of {', '.join(KINDS)})")
        if args.head_dim <= 0 or args.head_dim % 2:
            raise UserError(f"--head-dim must be a positive even number, got {args.head_dim}")
        if not (args.base > 1 and math.isfinite(args.base)):
            raise UserError(f"--base must be a finite number > 1, got {args.base:g}")
        if not args.factor >= 1 or not math.isfinite(args.factor):
            raise UserError(f"--factor must be >= 1, got {args.factor:g}")
        if args.original_max_position <= 0:
            raise UserError(f"--original-max-position must be positive, got {args.original_max_position}")
        cfg = RopeConfig(
            kind=args.kind,
            head_dim=args.head_dim,
            base=args.base,
            original_max_position=args.original_max_position,
            factor=args.factor,
            beta_fast=args.beta_fast,
            beta_slow=args.beta_slow,
            resonance=args.resonance,
        )
        target = args.target_max_position
        if target is None:
            target = cfg.target_max_position if cfg.factor > 1 else 2 * cfg.original_max_position
        if target <= 0:
            raise UserError(f"--target-max-position must be positive, got {target}")
        r = report(compute_frequencies(cfg), target)
        if args.plot:
            write_plot(r, args.plot)
        if args.json:
            print(json.dumps(r.to_dict()))
        else:
            print(format_table(r))
            if args.plot:
                print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
