"""Plain-text / markdown tables and run metadata shared by ``fused-adv bench`` and ``demo``."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys
from typing import Sequence

import torch


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], *, markdown: bool = False) -> str:
    """``columns`` = [(key, header)]; values are already formatted or are formatted with str()."""
    cells = [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    headers = [h for _, h in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(vals):
        parts = [v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths))]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts)

    out = [line(headers)]
    if markdown:
        out.append("|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(c) for c in cells]
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01:
            return f"{v:.2f}"
        return f"{v:.2e}"
    return str(v)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    device = torch.device(device)
    def clean(name: str) -> str:
        name = re.sub(r"\((R|TM)\)|\bCPU\b|@.*?GHz|\bprocessor\b", " ", name, flags=re.I)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")

    if device.type == "cuda":
        return clean(torch.cuda.get_device_name(device))[:60]
    return f"cpu-{clean(cpu_name())}-{os.cpu_count()}c"[:60]


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "platform": platform.platform()}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except Exception:
        out["transformers"] = None
    import fused_adv
    out["fused_adv"] = fused_adv.__version__
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(fused_adv.__file__)), timeout=5)
        out["git_commit"] = commit.stdout.strip() or None
    except Exception:
        out["git_commit"] = None
    return out


def backends_summary(device: torch.device) -> dict:
    from fused_adv.ops import BACKENDS, why_not
    return {b: (why_not(b, torch.device(device), "restore_") or "available") for b in BACKENDS}


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def python_cmd() -> str:
    return " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: a CPU benchmark on a busy machine says so in its results."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None
