"""On a CUDA device, the fused classes never synchronise the host (DESIGN.md §3): every
zero/NaN guard is a device-side select.  Checked with torch.cuda.set_sync_debug_mode("error"),
which raises on any synchronising call.  Skipped without CUDA."""
import pytest
import torch

import fused_adv
from loops import loss_of
from models import ToyBert, batch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("cls", ["FGM", "FGSM", "PGD", "AWP"])
def test_attack_and_restore_do_not_sync(cls, device_backend):
    device, backend = device_backend
    if device != "cuda":
        pytest.skip("host syncs are a CUDA matter")
    torch.manual_seed(0)
    model = ToyBert().to(device)
    loss_of(model, [t.to(device) for t in batch(0)]).backward()
    if cls == "AWP":
        adv = fused_adv.AWP(model, torch.optim.SGD(model.parameters(), lr=0.1), backend=backend)
        adv.attack_step(first=True)  # warm-up: lazy imports, kernel compilation, allocations
        adv.restore()
    else:
        adv = getattr(fused_adv, cls)(model, backend=backend)
        kw = {"is_first_attack": True} if cls == "PGD" else {}
        adv.attack(**kw)
        adv.restore()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            if cls == "AWP":
                adv.attack_step(first=True)
                adv.attack_step(first=False)
                adv.restore()
            elif cls == "PGD":
                adv.attack(is_first_attack=True)
                adv.attack()
                adv.restore()
            else:
                adv.attack()
                adv.restore()
    finally:
        torch.cuda.set_sync_debug_mode("default")
