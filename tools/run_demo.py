"""`make demo`: the whole path on the embedded default, on a laptop CPU.

    python tools/run_demo.py --out outputs/demo [--nproc 2]

1. data: corpus (this machine's Python standard library) -> SentencePiece tokenizer -> indexed datasets;
2. pretrain the demo LLaMA at sequence length 128 with 2 processes (tensor parallel, TP=2);
3. extend it to 512 (s = 4) twice, with `yarn` and with `resonance_yarn` (data parallel, DP=2);
4. evaluate held-out perplexity at 128..512 for the unextended `rope` model, `yarn` and `resonance_yarn`;
5. PosGen (`--preset demo`): train the small PosGen model at length 64 with rope and with resonance on the
   recursive task and test it at 256 as all four variants (`posgen_recursive.png`);
6. write `report.json` ({"perplexity": {variant: {length: ppl}}, "posgen": ...}), `report.md`,
   `perplexity.png` and `posgen_recursive.png`.

Each finished stage leaves a marker under `<out>/stages/`; a re-run skips it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_resonance.cli import ArgumentParser, check_output_dir, guard  # noqa: E402
from megatron_resonance.errors import TrainingError, UserError  # noqa: E402

# data.prepare (sentencepiece) is imported when the stages run: --help runs without it.

PROG = "run_demo.py"

LENGTHS = (128, 256, 384, 512)
VARIANTS = ("rope", "yarn", "resonance_yarn")
POSGEN_TASK = "recursive"
"""The PosGen task of the demo preset: the one a small model learns in a minute."""


class Demo:
    def __init__(self, out: Path, nproc: int):
        self.out = out
        self.nproc = nproc
        self.stages = out / "stages"
        self.stages.mkdir(parents=True, exist_ok=True)
        self.timings = {}

    def stage(self, name: str, fn) -> None:
        marker = self.stages / f"{name}.done"
        if marker.exists():
            print(f"==> {name}: done earlier, skipping ({marker})", flush=True)
            self.timings[name] = json.loads(marker.read_text()).get("seconds")
            return
        print(f"==> {name}", flush=True)
        start = time.time()
        fn()
        seconds = round(time.time() - start, 1)
        self.timings[name] = seconds
        marker.write_text(json.dumps({"seconds": seconds}))
        print(f"==> {name}: {seconds:.0f} s", flush=True)

    def run(self, *cmd) -> None:
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        code = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, env=env).returncode
        if code:  # the stage printed its error line above
            raise TrainingError(f"{cmd[0]} exited with status {code}; rerun to resume from the stages done")

    # -------------------------------------------------------------------------------------- stages
    def data(self) -> None:
        from megatron_resonance.data.prepare import prepare_default_data

        prepare_default_data(self.out / "data", workers=self.nproc)

    def data_flags(self):
        return [
            "--data-path", self.out / "data" / "train",
            "--valid-data-path", self.out / "data" / "valid",
            "--tokenizer-model", self.out / "data" / "tokenizer.model",
        ]  # fmt: skip

    def pretrain(self) -> None:
        self.run(
            "pretrain/pretrain_llama.py", "--nproc-per-node", self.nproc, "--config", "configs/demo.yaml",
            "--tensor-model-parallel-size", min(2, self.nproc), "--save", self.out / "ckpt" / "rope",
            *self.data_flags(),
        )  # fmt: skip

    def extend(self, kind: str) -> None:
        self.run(
            "finetune/extend_context.py", "--nproc-per-node", self.nproc, "--config", "configs/demo_extend.yaml",
            "--load", self.out / "ckpt" / "rope", "--rope-kind", kind, "--save", self.out / "ckpt" / kind,
            *self.data_flags(),
        )  # fmt: skip

    def evaluate(self) -> None:
        loads = []
        for v in VARIANTS:
            loads += ["--load", self.out / "ckpt" / v, "--name", v]
        self.run(
            "tools/eval_perplexity.py", *loads, "--lengths", ",".join(map(str, LENGTHS)),
            "--data", self.out / "data" / "valid", "--out", self.out / "eval",
        )  # fmt: skip

    def posgen(self) -> None:
        self.run(
            "tools/posgen_benchmark.py", "--preset", "demo", "--workers", self.nproc, "--out", self.out / "posgen",
        )  # fmt: skip

    def report(self) -> None:
        evaluated = json.loads((self.out / "eval" / "report.json").read_text())
        ppl = {v: {str(k): float(x) for k, x in evaluated["perplexity"][v].items()} for v in VARIANTS}
        posgen = json.loads((self.out / "posgen" / "report.json").read_text())
        accuracy = {
            metric: {v: posgen[metric][POSGEN_TASK][v]["mean"] for v in posgen["variants"]}
            for metric in ("id_accuracy", "ood_accuracy")
        }
        report = {
            "perplexity": ppl,
            "lengths": list(LENGTHS),
            "posgen": {"task": POSGEN_TASK, **accuracy},
            "stage_seconds": self.timings,
        }
        (self.out / "report.json").write_text(json.dumps(report, indent=2))
        lines = [
            "# megatron-resonance demo: held-out perplexity by context length",
            "",
            "Pretrained at 128 tokens (`rope`), extended to 512 (s = 4) with `yarn` and `resonance_yarn`.",
            "",
            "| variant | " + " | ".join(str(n) for n in LENGTHS) + " |",
            "|---|" + "---|" * len(LENGTHS),
        ]
        for v in VARIANTS:
            lines.append(f"| {v} | " + " | ".join(f"{ppl[v][str(n)]:.2f}" for n in LENGTHS) + " |")
        lines += [
            "",
            f"PosGen `{POSGEN_TASK}`: trained at length 64, teacher-forced accuracy (%) at positions 4–63 and "
            "64–255 (`posgen_recursive.png` shows it by position).",
            "",
            "| variant | in distribution | beyond the training length |",
            "|---|---|---|",
        ]
        for v in posgen["variants"]:
            lines.append(f"| {v} | {100 * accuracy['id_accuracy'][v]:.1f} | {100 * accuracy['ood_accuracy'][v]:.1f} |")
        lines += ["", "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in self.timings.items())]
        (self.out / "report.md").write_text("\n".join(lines) + "\n")
        for plot, name in (
            (self.out / "eval" / "perplexity.png", "perplexity.png"),
            (self.out / "posgen" / f"position_{POSGEN_TASK}.png", f"posgen_{POSGEN_TASK}.png"),
        ):
            if plot.exists():
                (self.out / name).write_bytes(plot.read_bytes())
        print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/demo", help="output directory")
    p.add_argument("--nproc", type=int, default=2, help="processes for training (torchrun)")
    args = p.parse_args(argv)
    with guard(PROG):
        if args.nproc < 1:
            raise UserError(f"--nproc must be >= 1, got {args.nproc}")
        check_output_dir(args.out, "--out")
        demo = Demo(Path(args.out).resolve(), args.nproc)
        start = time.time()
        demo.stage("data", demo.data)
        demo.stage("pretrain", demo.pretrain)
        for kind in VARIANTS[1:]:
            demo.stage(f"extend_{kind}", lambda kind=kind: demo.extend(kind))
        demo.stage("evaluate", demo.evaluate)
        demo.stage("posgen", demo.posgen)
        demo.report()
    print(f"\ndemo finished in {time.time() - start:.0f} s; results in {demo.out}:")
    for name in ("report.json", "report.md", "perplexity.png", f"posgen_{POSGEN_TASK}.png"):
        print(f"  {demo.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
