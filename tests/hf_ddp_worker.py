"""Worker for the DDP tests of tests/test_hf_trainer*.py: one rank of a 2-process CPU (gloo) DDP
run of the Trainer with the adversarial mixin.  Launched by torch.distributed.run (see
hf_harness.run_ddp_worker); rank 0 writes the trained parameters and what it saw to argv[1].

argv: OUT_FILE METHOD.  fgm/fgsm/pgd/awp: two runs, clean_pass_no_sync False then True (keys
False/True); freelb/smart/sift: one run (key None).
"""
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

import hf_harness as T


def run(out_file, method, no_sync):
    seen = []

    class Recording(T.AdvTrainer):
        def training_step(self, model, *args, **kwargs):
            assert isinstance(model, DistributedDataParallel), type(model)
            if not seen:
                # record, at every forward, whether this backward will all-reduce
                model.register_forward_pre_hook(lambda m, a: seen.append(bool(m.require_backward_grad_sync)))
            return super().training_step(model, *args, **kwargs)

    def plain_loss_scaling(tr):
        # BERT ignores num_items_in_batch; without this the Trainer would multiply its loss by the
        # world size (average_tokens_across_devices) and the oracle would need that factor too
        tr.model_accepts_loss_kwargs = False

    options = {} if no_sync is None else {"clean_pass_no_sync": no_sync}
    tr = T.run_trainer(out_file + ".d", method, steps=2, trainer_cls=Recording, setup=plain_loss_scaling,
                       args_kw={"ddp_backend": "gloo"}, **options)
    return {"params": {n: p.detach().clone() for n, p in tr.model.named_parameters()},
            "seen": seen, "world": tr.args.world_size, "rank": tr.args.process_index}


def main():
    out_file, method = sys.argv[1], sys.argv[2]
    modes = (None,) if method in ("freelb", "smart", "sift") else (False, True)
    results = {no_sync: run(out_file, method, no_sync) for no_sync in modes}
    if results[modes[0]]["rank"] == 0:
        torch.save(results, out_file)


if __name__ == "__main__":
    main()
