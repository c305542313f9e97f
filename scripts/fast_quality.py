"""How far fast mode's changes move MAGNeT's outputs, change by change (the evidence behind the README's
"Speed" section). No download: the fixtures of ../shared/reference and real-size random-weight models.

    python scripts/fast_quality.py [--scale small] [--frames 500] [--paths int8 bf16 bf16-fp32attn] [--fixtures]

It first prints the CPU's features and the linear layers fast mode chooses on it (`choose_linears`).

1. the low-precision linear layers, each path of --paths that runs here: 'int8' (int8 weights, dynamically
   quantized int8 activations), 'bf16' (bf16 weights and activations; self-attention reads bf16 q/k/v,
   `DecodingSettings.bf16_attention`) and 'bf16-fp32attn' (the same with float32 attention). One forward per
   stage on the same codes (half of them masked), fp32 vs the path: relative logit error, KL(p_fp32 || p_path)
   of the guided distribution at temperature 1 with the guidance coefficients of the first and last steps
   (10 and 1), and how often the argmax agrees. The weights are float16 values, as the releases are published.
2. the null pass dropped where the guidance coefficient is 1: the coefficient of the last step of a
   stage is 1 - 3.9e-7 (cos(pi/2) in float32 is -4.4e-8), so the guided logits move by 3.9e-7 x
   (cond - uncond): the same numbers, and the same argmax, on these models.
3. fewer steps for codebooks >= 1: codebook 0 is decoded exactly as in exact mode (see
   tests/test_speed.py); for the later codebooks this script only reports how many tokens differ from
   the 10-step decoding, which with random weights says nothing about quality (see the README).
4. end to end on the fixtures (--fixtures): greedy decodings, exact vs each change alone (each path of
   --paths) vs all of them (with each path).

Random weights give activations without the outlier channels trained transformers develop, which are
what makes int8 activation quantization lose accuracy, so (1) is a lower bound on the error a trained
release sees; the fixtures' weights are random too.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
REFERENCE = HERE.parents[2] / "shared" / "reference"           # the reference fixtures beside the project

# name -> (FastMode.linears, DecodingSettings.bf16_attention)
VARIANTS = {"int8": ("int8", True), "bf16": ("bf16", True), "bf16-fp32attn": ("bf16", False)}


def runs_here(name: str) -> bool:
    from magnet import linears
    return {"int8": linears.int8_available, "bf16": linears.bf16_available}[VARIANTS[name][0]]()


def forward(lm, codes, mem, stage: int, copy=None) -> torch.Tensor:
    """One stage's logits [rows, T, card]: on a fast copy, or exactly (copy None: the float32 weights, restored
    from the float16 records a fast copy leaves; this drops the copy)."""
    from magnet import lowp
    from magnet.stage_forward import parallel_forward
    if copy is None:
        lowp.restore(lm)
    with torch.inference_mode():
        return parallel_forward(lm, codes, mem, stage, [stage], copy=copy)[:, 0].float()


def compare(a: torch.Tensor, b: torch.Tensor, B: int) -> dict:
    from magnet.sampling import cfg_mix
    out = {"rel_err": ((a - b).norm() / a.norm()).item()}
    for coef in (10.0, 1.0):
        pa = torch.log_softmax(cfg_mix(a, B, coef), -1)
        pb = torch.log_softmax(cfg_mix(b, B, coef), -1)
        out[f"kl@{coef:g}"] = (pa.exp() * (pa - pb)).sum(-1).mean().item()
        out[f"top1@{coef:g}"] = (pa.argmax(-1) == pb.argmax(-1)).float().mean().item()
    return out


def report_line(label: str, r: dict) -> str:
    return (f"  {label:7}: logits rel. error {r['rel_err']:.4f}; KL {r['kl@10']:.2e} nats (cfg 10), "
            f"{r['kl@1']:.2e} (cfg 1); argmax agrees {100 * r['top1@10']:.1f}% (cfg 10), "
            f"{100 * r['top1@1']:.1f}% (cfg 1)")


def random_model_report(scale: str, frames: int, paths: list):
    from magnet.linears import fast_copy
    from magnet.random_models import random_lm
    from magnet.sampling import cfg_mix
    lm = random_lm(scale, seconds=frames / 50)          # float16 values, as the releases are published
    card, n_q = lm.cfg.card, lm.cfg.n_q
    g = torch.Generator().manual_seed(0)
    B, L = 1, 12
    hidden = torch.randn(2 * B, L, lm.cfg.text_dim, generator=g)
    mask = torch.ones(2 * B, L, dtype=torch.long)
    mask[B:] = 0
    with torch.inference_mode():
        mem = lm.memory(hidden, mask, null_rows=B)
    inputs = []
    for stage in range(n_q):
        codes = torch.randint(0, card, (B, n_q, frames), generator=g)
        codes[:, stage + 1:] = card
        codes[:, stage, torch.rand(frames, generator=g) < 0.5] = card
        inputs.append(codes)
    refs = [forward(lm, codes, mem, stage) for stage, codes in enumerate(inputs)]
    for name in paths:
        path, attn = VARIANTS[name]
        copy = fast_copy(lm, path, bf16_attention=attn)
        print(f"{name} vs fp32, real-size {scale} LM with random float16-valued weights, {frames} frames, "
              f"half the positions masked:")
        rs = [compare(ref, forward(lm, codes, mem, stage, copy), B)
              for stage, (ref, codes) in enumerate(zip(refs, inputs))]
        for stage, r in enumerate(rs):
            print(report_line(f"stage {stage}", r))
        print(report_line("mean", {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]}))
    m = float(torch.cos(torch.tensor(1.0) * math.pi * 0.5))        # the masking rate of a stage's last step
    coef = m * 10 + (1 - m) * 1
    a = forward(lm, torch.randint(0, card, (B, n_q, frames), generator=g), mem, 1)
    mixed, cond = cfg_mix(a, B, coef), a[:B]
    same = (mixed.argmax(-1) == cond.argmax(-1)).float().mean().item()
    print(f"null pass at the last step (coefficient {coef!r}): max |logit change| "
          f"{(mixed - cond).abs().max().item():.2e}, argmax agrees {100 * same:.2f}%")


def fixture_report(paths: list):
    from safetensors.torch import load_file

    from magnet import MagnetModel
    from magnet.sampling import FastMode, SamplingParams
    golden = load_file(str(REFERENCE / "golden.safetensors"))
    # (label, fast mode, DecodingSettings.bf16_attention)
    rows = ([(f"{name} only", FastMode(later_steps=None, skip_unit_cfg=False, linears=VARIANTS[name][0]),
              VARIANTS[name][1]) for name in paths]
            + [("null-pass skip only", FastMode(later_steps=None, linears="fp32"), True),
               ("steps 20,5,5,5 only", FastMode(linears="fp32", skip_unit_cfg=False), True)]
            + [(f"all, {name}", FastMode(linears=VARIANTS[name][0]), VARIANTS[name][1]) for name in paths])
    for name, t5 in (("music", "t5-base"), ("audio", "t5-large")):
        model = MagnetModel.from_pretrained(REFERENCE / f"magnet-{name}", text_encoder=REFERENCE / t5, device="cpu")
        ids = golden[f"{name}.t5_input_ids"]                 # the goldens' prompts, cond rows first
        cond = model.encode_text(model.text_encoder.tokenizer.batch_decode(ids[: ids.shape[0] // 2],
                                                                           skip_special_tokens=True))
        base = SamplingParams(use_sampling=False, decoding_steps=(20, 10, 10, 10))
        exact = model.generate_from_condition(cond, frames=100, params=base).codes
        print(f"fixture {name} (greedy, 100 frames, steps 20,10,10,10): tokens equal to exact mode, per codebook")
        settings = model.decoding
        for label, fast, attn in rows:
            model.decoding = replace(settings, bf16_attention=attn)
            codes = model.generate_from_condition(cond, frames=100, params=replace(base, fast=fast)).codes
            agree = (codes == exact).float().mean(dim=(0, 2))
            print(f"  {label:22} " + "  ".join(f"cb{k} {100 * v:5.1f}%" for k, v in enumerate(agree.tolist())))
        model.decoding = settings


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="small", choices=["small", "medium"])
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--paths", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="the low-precision paths to compare with fp32 (default: all)")
    ap.add_argument("--fixtures", action="store_true", help="also decode the fixtures end to end")
    a = ap.parse_args()
    from magnet.linears import choose_linears, cpu_features_text
    print(f"CPU: {cpu_features_text()}; fast mode here: {choose_linears().describe()}")
    paths = [name for name in a.paths if runs_here(name)]
    for name in sorted(set(a.paths) - set(paths)):
        print(f"{name}: this torch has no kernels for it here, skipped")
    torch.manual_seed(0)
    random_model_report(a.scale, a.frames, paths)
    if a.fixtures:
        fixture_report(paths)


if __name__ == "__main__":
    main()
