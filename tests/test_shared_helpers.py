"""fused_adv._shared pinned on its own: every helper the reference (oracle) classes and the fused
drop-ins BOTH call, on small float64 cases worked out by hand in the test (the fused-vs-reference
tests cannot catch an error in these: it would show on both sides).

Also pins the structure that makes the fused-vs-reference tests meaningful: no fused class
inherits from or imports the oracle, and every public entry point has its own docstring."""
import ast
import contextlib
import inspect
import math
import pathlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fused_adv
import fused_adv.sift as fused_sift
from fused_adv import _shared as S
from fused_adv import reference

F64 = torch.float64
LOG3 = math.log(3.0)


def t(values, dtype=F64, **kw):
    return torch.tensor(values, dtype=dtype, **kw)


# ------------------------------------------------------------------------------------------ AWP
class Recorder(nn.Module):
    """model(input_ids=..., attention_mask=..., labels=...) recording its kwargs; the loss is
    w * (sum of input_ids) per sample, so d loss.mean()/dw = mean row sum of input_ids."""

    def __init__(self, tuple_output=False):
        super().__init__()
        self.w = nn.Parameter(t([2.0]))
        self.tuple_output = tuple_output
        self.calls = []

    def forward(self, input_ids, attention_mask, labels):
        self.calls.append((input_ids, attention_mask, labels))
        loss = self.w * input_ids.to(F64).sum(-1)  # [B]
        return (loss, "logits") if self.tuple_output else SimpleNamespace(loss=loss, logits=None)


@pytest.mark.parametrize("tuple_output", [False, True])
def test_awp_model_loss_call_convention(tuple_output):
    model = Recorder(tuple_output)
    x, mask, y = torch.tensor([[1, 2], [3, 4]]), torch.ones(2, 2), torch.tensor([0, 1])
    loss = S.awp_model_loss(model, x, y, mask)
    # per-sample losses 2*3 = 6 and 2*7 = 14, averaged: 10
    assert loss.shape == () and loss.item() == 10.0
    (cx, cmask, cy), = model.calls
    assert cx is x and cmask is mask and cy is y


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_awp_autocast_choice():
    assert isinstance(S.awp_autocast(False), contextlib.nullcontext)
    assert isinstance(S.awp_autocast(True), torch.autocast)
    assert isinstance(S.awp_autocast(None), torch.autocast if torch.cuda.is_available() else contextlib.nullcontext)


class LoggingSGD(torch.optim.SGD):
    def __init__(self, params, log):
        super().__init__(params, lr=0.1)
        self.log = log

    def zero_grad(self, set_to_none=True):
        self.log.append("zero_grad")
        super().zero_grad(set_to_none)


def test_awp_adversarial_pass_discards_the_clean_gradient():
    w = nn.Parameter(t([2.0]))
    w.grad = t([100.0])                                  # the clean gradient
    log = []
    opt = LoggingSGD([w], log)

    def closure():
        log.append("forward")
        return 3 * (w ** 2).sum()                        # 12, d/dw = 6w = 12
    loss = S.awp_adversarial_pass(nn.Module(), opt, closure=closure, autocast=False)
    assert log == ["forward", "zero_grad"]               # zeroed after the forward, before backward
    assert loss.item() == 12.0 and loss.requires_grad    # not detached
    assert w.grad.tolist() == [12.0]                     # only the adversarial gradient


def test_awp_adversarial_pass_backward_choices():
    w = nn.Parameter(t([2.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    closure = lambda: 3 * (w ** 2).sum()                 # noqa: E731  d/dw = 12

    S.awp_adversarial_pass(None, opt, closure=closure, backward=lambda l: (2 * l).backward(), autocast=False)
    assert w.grad.tolist() == [24.0]                     # the caller's backward

    class Scaler:
        def scale(self, loss):
            return 4 * loss
    S.awp_adversarial_pass(None, opt, closure=closure, scaler=Scaler(), autocast=False)
    assert w.grad.tolist() == [48.0]                     # scaler.scale(loss).backward()

    # backward= wins over the scaler
    S.awp_adversarial_pass(None, opt, closure=closure, scaler=Scaler(), backward=lambda l: l.backward(),
                           autocast=False)
    assert w.grad.tolist() == [12.0]


def test_awp_adversarial_pass_kaggle_convention_and_errors():
    model = Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.w.grad = t([-5.0])
    loss = S.awp_adversarial_pass(model, opt, x=torch.tensor([[1, 2], [3, 4]]), y=torch.tensor([0, 1]),
                                  attention_mask=torch.ones(2, 2), autocast=False)
    assert loss.item() == 10.0 and model.w.grad.tolist() == [5.0]   # mean row sum (3 + 7) / 2

    def boom():
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        S.awp_adversarial_pass(model, opt, closure=boom, autocast=False)
    assert model.w.grad.tolist() == [5.0]                # the forward raised before zero_grad


# --------------------------------------------------------------------------------------- FreeLB
def test_check_freelb_norm_type():
    assert S.check_freelb_norm_type("l2") == "l2" and S.check_freelb_norm_type("linf") == "linf"
    with pytest.raises(ValueError, match="adv_norm_type"):
        S.check_freelb_norm_type("l1")
    for cls in (reference.FreeLB, fused_adv.FreeLB):
        with pytest.raises(ValueError, match="adv_norm_type"):
            cls(adv_norm_type="L2")


def test_lookup_embeddings():
    emb = nn.Embedding(4, 2).to(F64)
    with torch.no_grad():
        emb.weight.copy_(t([[0, 0], [1, 2], [3, 4], [5, 6]]))
    ids = torch.tensor([[1, 3], [2, 2]])
    want = t([[[1, 2], [5, 6]], [[3, 4], [3, 4]]])
    assert torch.equal(S.lookup_embeddings(None, emb, ids), want)
    model = SimpleNamespace(get_input_embeddings=lambda: emb)
    out = S.lookup_embeddings(model, None, ids)
    assert torch.equal(out, want) and out.requires_grad   # graph to the weight kept
    other = nn.Embedding(4, 2).to(F64)
    assert torch.equal(S.lookup_embeddings(model, other, ids), other(ids))  # an explicit module wins
    with pytest.raises(AttributeError):
        S.lookup_embeddings(object(), None, ids)


MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])  # lengths 2 and 1; E = 2: dims 4 and 2


def test_freelb_init_delta_zero_magnitude_draws_nothing():
    embeds = torch.randn(2, 3, 2, dtype=F64)
    state = torch.get_rng_state()
    delta = S.freelb_init_delta(embeds, MASK, 0.0, "l2")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(delta, torch.zeros(2, 3, 2, dtype=F64))


def test_freelb_init_delta_l2_by_hand():
    embeds = torch.zeros(2, 3, 2, dtype=F64)
    torch.manual_seed(0)
    u = torch.empty(2, 3, 2, dtype=F64).uniform_(-1, 1)      # the one draw the original makes
    torch.manual_seed(0)
    delta = S.freelb_init_delta(embeds, MASK, 0.5, "l2")
    # sample 0: 0.5 / sqrt(2 tokens * 2) = 0.25; sample 1: 0.5 / sqrt(1 * 2); padded tokens 0
    scale = t([[[0.25], [0.25], [0.0]], [[0.5 / math.sqrt(2)], [0.0], [0.0]]])
    torch.testing.assert_close(delta, u * scale, rtol=1e-15, atol=0)
    assert delta.dtype == F64 and not delta.requires_grad
    # exactly that one draw: the generator is where the single uniform_ left it
    after_init = torch.rand(3, dtype=F64)
    torch.manual_seed(0)
    torch.empty(2, 3, 2, dtype=F64).uniform_(-1, 1)
    assert torch.equal(after_init, torch.rand(3, dtype=F64))


def test_freelb_init_delta_linf_by_hand_and_dtype():
    embeds = torch.zeros(2, 3, 2, dtype=F64)
    torch.manual_seed(1)
    u = torch.empty(2, 3, 2, dtype=F64).uniform_(-0.3, 0.3)
    torch.manual_seed(1)
    delta = S.freelb_init_delta(embeds, MASK, 0.3, "linf")
    torch.testing.assert_close(delta, u * MASK.to(F64).unsqueeze(2), rtol=1e-15, atol=0)
    assert delta.abs().max() <= 0.3
    half = S.freelb_init_delta(embeds.to(torch.bfloat16), MASK, 0.3, "linf")
    assert half.dtype == torch.bfloat16 and half.shape == (2, 3, 2)


def test_freelb_init_delta_empty_sample_is_nan_as_the_original():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    delta = S.freelb_init_delta(torch.zeros(2, 3, 2, dtype=F64), mask, 0.5, "l2")
    assert torch.isfinite(delta[0]).all() and torch.isnan(delta[1]).all()   # 0 * (0.5 / 0) = NaN


def test_both_freelb_classes_use_the_shared_init():
    embeds = torch.randn(2, 3, 4, dtype=F64)
    for cls in (reference.FreeLB, fused_adv.FreeLB):
        torch.manual_seed(3)
        got = cls(adv_init_mag=0.2, adv_norm_type="linf").init_delta(embeds, MASK)
        torch.manual_seed(3)
        assert torch.equal(got, S.freelb_init_delta(embeds, MASK, 0.2, "linf"))


# ---------------------------------------------------------------------------------------- SMART
P_LOGITS = [LOG3, 0.0]    # softmax: [3/4, 1/4]
Q_LOGITS = [0.0, 0.0]     # softmax: [1/2, 1/2]


def test_stable_kl_by_hand():
    # eps = 0: r(q) = -log(1/q - 1) = log(q / (1-q)); r(p) = [log 3, -log 3], r(y) = [0, 0]
    # sum 2 p (r(p) - r(y)) = 2 (3/4 log 3 - 1/4 log 3) = log 3 per row
    logit = t([P_LOGITS, P_LOGITS], requires_grad=True)
    target = t([Q_LOGITS, Q_LOGITS], requires_grad=True)
    loss = S.stable_kl(logit, target, epsilon=0.0)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(LOG3, rel=1e-6)                              # / 2 rows
    assert S.stable_kl(logit, target, epsilon=0.0, reduce=False).item() == pytest.approx(2 * LOG3, rel=1e-6)
    loss.backward()
    # r detached: d/dlogit_i = 2 p_i (v_i - sum_j p_j v_j) / rows, v = [log 3, -log 3], sum p v = log3 / 2
    row = [0.75 * LOG3 / 2, -0.75 * LOG3 / 2]
    torch.testing.assert_close(logit.grad, t([row, row]), rtol=1e-6, atol=1e-7)
    assert target.grad is None                                                       # no path to target


def test_stable_kl_default_epsilon_and_3d_input():
    logit = t([[P_LOGITS]])                                                          # [1, 1, 2]
    target = t([[Q_LOGITS]])
    eps = 1e-6
    r = lambda q: -math.log(1 / (q + eps) - 1 + eps)                                 # noqa: E731
    want = 2 * (0.75 * (r(0.75) - r(0.5)) + 0.25 * (r(0.25) - r(0.5)))
    assert S.stable_kl(logit, target).item() == pytest.approx(want, rel=1e-6)


def test_sym_kl_batchmean_by_hand():
    inp = t([P_LOGITS, P_LOGITS], requires_grad=True)                                # p = [3/4, 1/4]
    tgt = t([Q_LOGITS, Q_LOGITS], requires_grad=True)                                # q = [1/2, 1/2]
    kl_q_p = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl_p_q = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    loss = S.sym_kl_batchmean(inp, tgt)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(kl_q_p + kl_p_q, rel=1e-6)
    loss.backward()
    # each direction's target is detached: d/dinput = (p - q) / B, d/dtarget = (q - p) / B
    torch.testing.assert_close(inp.grad, t([[0.125, -0.125]] * 2), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tgt.grad, t([[-0.125, 0.125]] * 2), rtol=1e-6, atol=1e-7)


class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(t([2.0]))

    def forward(self, x):
        return x * self.scale


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.runs = 0

    def forward(self, h):
        self.runs += 1
        return h.sum(-1, keepdim=True) * t([1.0, -1.0])


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = Embeddings()


class ToyHF(nn.Module):
    """base_model.embeddings then a head; forward(x=...) returns an object with .logits."""

    def __init__(self):
        super().__init__()
        self.base = Base()
        self.head = Head()

    @property
    def base_model(self):
        return self.base

    def forward(self, x):
        return SimpleNamespace(logits=self.head(self.base.embeddings(x)))


def test_embedding_module_of():
    model = ToyHF()
    assert S.embedding_module_of(model) is model.base.embeddings
    assert S.embedding_module_of(model.base) is model.base.embeddings      # no base_model: itself
    with pytest.raises(ValueError, match="embedding_module="):
        S.embedding_module_of(nn.Linear(2, 2))


def test_embedding_output_stops_after_the_module():
    model = ToyHF()
    module = model.base.embeddings
    out = S.embedding_output(model, module, {"x": t([[1.0, 2.0]])})
    assert torch.equal(out, t([[2.0, 4.0]])) and out.requires_grad         # graph to the parameters
    assert model.head.runs == 0 and not module._forward_hooks               # stopped, hook removed
    out.sum().backward()
    assert model.base.embeddings.scale.grad.tolist() == [3.0]
    with pytest.raises(RuntimeError, match="did not run"):
        S.embedding_output(model, nn.Linear(1, 1), {"x": t([[1.0]])})


def test_logits_with_embedding_replaces_the_output():
    model = ToyHF()
    module = model.base.embeddings
    logits = S.logits_with_embedding(model, module, {"x": t([[1.0, 2.0]])}, t([[10.0, 20.0]]))
    assert torch.equal(logits, t([[30.0, -30.0]])) and not module._forward_hooks
    with pytest.raises(TypeError):                                          # hook removed on error too
        S.logits_with_embedding(model, module, {"wrong": 1}, t([[1.0]]))
    assert not module._forward_hooks


# ----------------------------------------------------------------------------------------- SiFT
def test_symmetric_kl_by_hand():
    logits = t([[P_LOGITS] * 3] * 2, requires_grad=True)                    # [2, 3, 2] -> 6 rows
    target = t([[Q_LOGITS] * 3] * 2, requires_grad=True)
    # floss = sum p_t (-log p_s) = -(log 3/4 + log 1/4) / 2; bloss = sum p_s (-log p_t) = log 2
    want = -0.5 * (math.log(0.75) + math.log(0.25)) + math.log(2)
    out = S.symmetric_kl(logits, target)
    assert out.shape == (6,) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((6,), want, dtype=torch.float32))
    out.sum().backward()
    # probabilities detached: d/dlogits = p_s - p_t, d/dtarget = p_t - p_s
    torch.testing.assert_close(logits.grad, t([[[0.25, -0.25]] * 3] * 2), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(target.grad, t([[[-0.25, 0.25]] * 3] * 2), rtol=1e-6, atol=1e-7)


def test_kl_by_hand():
    logits = t([P_LOGITS], requires_grad=True)
    target = t([Q_LOGITS], requires_grad=True)
    out = S.kl(logits, target)
    assert out.shape == (1,) and out.item() == pytest.approx(-0.5 * (math.log(0.75) + math.log(0.25)), rel=1e-6)
    out.sum().backward()
    torch.testing.assert_close(logits.grad, t([[0.25, -0.25]]), rtol=1e-6, atol=1e-7)
    assert target.grad is None                                              # target detached


def test_mse_by_hand():
    logits = t([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    target = t([[0.0, 0.0], [0.0, 2.0]], requires_grad=True)
    out = S.mse(logits, target)
    assert out.shape == () and out.item() == 4.5                            # (1 + 4 + 9 + 4) / 4
    out.backward()
    torch.testing.assert_close(target.grad, t([[-0.5, -1.0], [-1.5, -1.0]]))  # -2 (l - t) / 4: not detached


def test_loss_table_and_module_api():
    assert S.perturbation_loss_fns == {"symmetric-kl": S.symmetric_kl, "kl": S.kl, "mse": S.mse}
    for module in (fused_sift, reference.sift):   # DeBERTa's module API, the same functions
        for name in ("symmetric_kl", "kl", "mse", "perturbation_loss_fns"):
            assert getattr(module, name) is getattr(S, name)


# ------------------------------------------------------------------------------------ structure
FUSED_CLASSES = [fused_adv.FGM, fused_adv.FGSM, fused_adv.PGD, fused_adv.AWP, fused_adv.FreeLB, fused_adv.SMART,
                 fused_sift.AdversarialLearner, fused_sift.PerturbationLayer, fused_adv.MIFGSM,
                 fused_adv.AdvWeightPerturb, fused_adv.FreeAT, fused_adv.YOPO]
REFERENCE_CLASSES = [reference.FGM, reference.FGSM, reference.PGD, reference.AWP, reference.FreeLB,
                     reference.SMART, reference.AdversarialLearner, reference.PerturbationLayer, reference.MIFGSM,
                     reference.AdvWeightPerturb, reference.FreeAT, reference.YOPO]


def test_fused_classes_do_not_inherit_from_the_oracle():
    for cls in FUSED_CLASSES:
        bad = [b for b in cls.__mro__ if b.__module__.startswith("fused_adv.reference")]
        assert not bad, f"{cls.__qualname__} inherits {bad}"


def test_fused_modules_do_not_import_the_oracle():
    root = pathlib.Path(fused_adv.__file__).parent
    files = sorted((root / "methods").glob("*.py")) + [root / "sift.py", root / "_shared.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("fused_adv.reference") for n in names), f"{path.name} imports {names}"


ENTRY_POINTS = ("__init__", "attack", "attack_backward", "attack_step", "backup_grad", "restore_grad", "loss",
                "restore", "perturbed", "update_delta", "init_delta", "forward", "adversarial_", "prepare",
                "cleanup", "replay", "train_batch", "inner_steps")


@pytest.mark.parametrize("cls", FUSED_CLASSES + REFERENCE_CLASSES, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_public_entry_points_have_their_own_docstrings(cls):
    assert cls.__doc__ and len(cls.__doc__) > 60, f"{cls.__name__} has no class docstring"
    sig = inspect.signature(cls.__init__)
    # the class docstring names every constructor argument
    for name in list(sig.parameters)[1:]:
        assert name in cls.__doc__, f"{cls.__name__}: constructor argument {name!r} not in the class docstring"
    for name in ENTRY_POINTS:
        fn = getattr(cls, name, None)
        if fn is None or (name in ("__init__", "forward") and fn in (object.__init__, nn.Module.__init__)):
            continue
        fn = inspect.unwrap(fn)
        doc = fn.__doc__
        assert doc and len(doc.split()) >= 8, f"{cls.__name__}.{name} has no docstring of its own"


SHARED_FUNCTIONS = [getattr(S, n) for n in S.__all__ if inspect.isfunction(getattr(S, n))]


@pytest.mark.parametrize("fn", [fused_sift.hook_sift_layer, reference.hook_sift_layer] + SHARED_FUNCTIONS,
                         ids=lambda f: f.__name__)
def test_shared_and_hook_functions_have_docstrings(fn):
    assert fn.__doc__ and len(fn.__doc__.split()) >= 8
