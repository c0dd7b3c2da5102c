"""The Triton backend of the fused_adv ops (imported lazily, one module per op family).

Importing this package does NOT import triton: the registry (fused_adv.ops._registry) imports
``fused_adv._triton.<family>`` (the ``triton_module`` of the family's OpFamily record) only when
the triton backend is asked to run an op, because importing triton costs about a second and is
useless on CPU-only installs.

* :mod:`fused_adv._triton.multi_tensor`: launch bookkeeping shared by every family (chunk and
  pointer tables in device memory, dtype grouping, fixed launch configs, the deterministic
  phase-2 reduction).
* :mod:`fused_adv._triton.weight`: the weight-space ops (FGM, FGSM, PGD, AWP, restore), with the
  exact names and signatures of fused_adv._torch.weight.
* :mod:`fused_adv._triton.activation`: the activation-space ops (SiFT, FreeLB, SMART), with the
  exact names and signatures of fused_adv._torch.activation.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run on CPU
tensors; that is how CI, which has no GPU, tests them.
"""
