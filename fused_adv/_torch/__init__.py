"""The pure-PyTorch backend (always available, any device): one module per op family.

``fused_adv._torch.<family>`` is the ``torch_module`` of the family's OpFamily record
(fused_adv/ops/<family>.py): one function per op, named like the op, with the schema's signature.
It serves every device where no native kernel is registered and is the executable statement of
the op math that the cpp, cuda and triton backends implement.
"""
