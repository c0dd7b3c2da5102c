"""``python -m fused_adv.info``: what this install can run, and why not where it cannot."""
from __future__ import annotations

import os
import platform

import torch

from fused_adv.ops import _library
from fused_adv.ops._registry import BACKENDS, resolve, why_not


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"


def report() -> str:
    import fused_adv

    lines = [
        f"fused_adv {fused_adv.__version__}  python {platform.python_version()}  torch {torch.__version__} "
        f"(cuda {torch.version.cuda})  triton {_version('triton')}  transformers {_version('transformers')}",
        f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
        f"compiled extension fused_adv._C: "
        + ("loaded" + (" with CUDA kernels" if _library.extension_built_with_cuda() else " (CPU kernels only)")
           if _library.EXTENSION is not None else f"absent ({_library.EXTENSION_ERROR})"),
        f"FUSED_ADV_BACKEND={os.environ.get('FUSED_ADV_BACKEND', '(unset: auto)')}  "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '(unset)')}",
        "",
    ]
    ops = list(_library.FAMILY_OF)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        device = torch.device(dev)
        lines.append(f"{dev} tensors:")
        for backend in BACKENDS:
            missing = {op: why_not(backend, device, op) for op in ops}
            bad = {op: r for op, r in missing.items() if r}
            if not bad:
                lines.append(f"  {backend:7s} available for all {len(ops)} ops")
            elif len(bad) == len(ops):
                lines.append(f"  {backend:7s} unavailable: {next(iter(bad.values()))}")
            else:
                lines.append(f"  {backend:7s} available for {len(ops) - len(bad)}/{len(ops)} ops; "
                             f"missing: {', '.join(bad)}")
        lines.append(f"  auto -> {resolve('auto', device, 'restore_')}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
