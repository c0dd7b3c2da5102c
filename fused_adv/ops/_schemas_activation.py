"""Schemas of the activation-space ops (SiFT, FreeLB, SMART), op family "activation".

As for fused_adv/ops/_schemas.py: the single source of truth is csrc/ops.cpp (the TORCH_LIBRARY
block), these strings define the ops from Python when the compiled extension is absent, and a
contract test checks that the two copies agree.

Conventions (all ops of this family):
- activations are contiguous [..., H] tensors ("rows" of H elements, rows = numel / H) for the
  row-wise ops, [B, ...] for the per-sample FreeLB ops (a "sample" is everything after dim 0);
- float16, bfloat16, float32 or float64; all math in float32 (float64 stays float64), rounded
  once when stored; statistics are float32 (float64 for float64 inputs);
- guards (NaN/Inf) are decided on the device; nothing is read back by the host;
- ``*_`` ops mutate the argument annotated ``(a!)`` in place.
"""

SCHEMAS: dict[str, str] = {
    # out = LN(x) (+ delta), LN without affine over the last dim; returns (out, mean, rstd)
    # with mean, rstd of shape [rows] (float32; float64 for float64 x).
    "ln_delta_fwd": "ln_delta_fwd(Tensor x, Tensor? delta, float eps) -> (Tensor, Tensor, Tensor)",
    # grad_x of the non-affine LayerNorm from (grad_out, x, mean, rstd).
    "ln_delta_bwd": "ln_delta_bwd(Tensor grad_out, Tensor x, Tensor mean, Tensor rstd) -> Tensor",
    # per row: (max_j |x_j| (NaN if the row has a NaN), sum_j x_j^2)  -> float32 [rows, 2]
    "row_absmax_sumsq": "row_absmax_sumsq(Tensor x) -> Tensor",
    # SiFT init: delta = clamp(float(noise), -bound, bound) (float32); out = (float(xhat) + delta)
    # in xhat's dtype.  Returns (delta, out).
    "sift_perturb": "sift_perturb(Tensor xhat, Tensor noise, float bound) -> (Tensor, Tensor)",
    # SiFT step: if sum(stats[:, 1]) is finite: delta += lr * g / (1e-6 + stats[row, 0]);
    # returns out = (float(xhat) + delta) in xhat's dtype.  stats = row_absmax_sumsq(grad).
    "sift_update_": "sift_update_(Tensor(a!) delta, Tensor grad, Tensor xhat, Tensor stats, float lr) -> Tensor",
    # SMART step: if sum(stats[:, 1]) is finite: v = noise + step_size * g;
    # noise <- v / (max_j |v_j| + epsilon) per row.  Returns ok (float32 0-dim, 1 or 0).
    "smart_update_": (
        "smart_update_(Tensor(a!) noise, Tensor grad, Tensor stats, float step_size, float epsilon) -> Tensor"
    ),
    # FreeLB per-sample statistics -> float32 [B, 3]:
    # l2: (sum g^2, sum delta*g, sum delta^2); linf: (max |g| (NaN-propagating), 0, 0).
    "freelb_reduce": "freelb_reduce(Tensor delta, Tensor grad, bool linf) -> Tensor",
    # FreeLB step + projection per sample (SPEC.md section 6), stats from freelb_reduce.
    "freelb_update_": (
        "freelb_update_(Tensor(a!) delta, Tensor grad, Tensor stats, float lr, float max_norm, bool linf) -> ()"
    ),
}
