"""``python -m bench.timm_coverage``: which popular timm classifiers rlrp_fast explains.

For each model (random weights, eval, the smallest input it is built for or ``--size``): build
an ``Explainer`` (R-LRP, trace verification on) and explain two images; a model counts as
explained when the map is finite and ``‖relevance‖₁ = |logit|`` per image (rel. 1e-3).
Otherwise the first line of the error is printed: the op and the module that block it.
Needs timm (``pip install timm``). One line per model as it is done, then the count.
"""
from __future__ import annotations

import argparse
import time

import torch

import rlrp_fast

# timm's most downloaded classification families (one model each), small variants
POPULAR = [
    "resnet18", "resnet50", "resnext50_32x4d", "seresnet50", "ecaresnet50d", "resnetv2_50",
    "densenet121", "inception_v3", "efficientnet_b0", "tf_efficientnetv2_s",
    "mobilenetv2_100", "mobilenetv3_large_100", "mixnet_s", "rexnet_100", "ghostnet_100",
    "regnety_008", "regnetx_002", "convnext_tiny", "vit_tiny_patch16_224",
    "vit_small_patch16_224", "deit_tiny_patch16_224", "beit_base_patch16_224",
    "swin_tiny_patch4_window7_224", "levit_128", "mobilevit_s", "poolformer_s12",
    "mixer_b16_224", "resmlp_12_224", "convmixer_768_32", "efficientformer_l1", "cait_xxs24_224",
    "coat_lite_tiny", "eva02_tiny_patch14_224", "fastvit_t8", "edgenext_small", "caformer_s18",
]


def probe(name: str, size: int | None) -> tuple[bool, str, float]:
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    side = size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    x = torch.randn(2, 3, side, side)
    start = time.perf_counter()
    try:
        e = rlrp_fast.Explainer(model).explain(x)
    except Exception as exc:  # noqa: BLE001 (reported, not raised)
        first = (str(exc).split(". Supported:")[0].splitlines() or [""])[0]
        return False, f"{type(exc).__name__}: {first[:300]}", time.perf_counter() - start
    mass = e.logits.double().gather(1, e.targets[:, None]).abs().view(-1)
    l1 = e.relevance.double().abs().flatten(1).sum(1)
    ok = bool(torch.isfinite(e.relevance).all()) and bool(((l1 - mass).abs()
                                                           <= 1e-3 * mass).all())
    return ok, "explained" if ok else f"not conserved: ‖R‖₁ {l1.tolist()} vs {mass.tolist()}", \
        time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=POPULAR)
    parser.add_argument("--size", type=int, default=None,
                        help="input side (default: the model's own)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    explained = 0
    for name in args.models:
        try:
            ok, what, seconds = probe(name, args.size)
        except Exception as exc:  # noqa: BLE001 (timm could not build it)
            ok, what, seconds = False, f"(timm: {type(exc).__name__}: {exc})"[:200], 0.0
        explained += ok
        print(f"{name:32s} {'yes' if ok else 'NO ':3s} {seconds:6.1f} s  {what}", flush=True)
    print(f"explained {explained} / {len(args.models)}")


if __name__ == "__main__":
    main()
