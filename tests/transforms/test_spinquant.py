"""SpinQuant's rotation training (quantlib.transforms.spinquant): Cayley SGD keeps R orthogonal and lowers the loss;
the learned rotations keep the full-precision model's function; the catalog entry runs end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import calib_tokens, tiny_model

from quantlib.transforms import activations as A
from quantlib.transforms import spinquant as S


def _orthogonality_error(R):
    return (R @ R.T - torch.eye(R.shape[0], dtype=R.dtype)).abs().max().item()


def test_cayley_sgd_stays_orthogonal_and_descends():
    # min ||R - T||^2 over orthogonal R, T a fixed orthogonal target: the loss falls and R stays on the manifold
    g = torch.Generator().manual_seed(0)
    T, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    R = torch.eye(32, dtype=torch.float64)
    losses = []
    for _ in range(50):
        Rv = R.clone().requires_grad_()
        loss = (Rv - T).pow(2).sum()
        loss.backward()
        losses.append(loss.item())
        R = S.cayley_step(R, Rv.grad, 0.1)
        assert _orthogonality_error(R) < 1e-10
    assert losses[-1] < 0.1 * losses[0]


def _loss(model, x):
    with torch.no_grad():
        return model(x, labels=x).loss.item()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_learned_rotations_lower_the_quantized_loss_and_keep_fp_function(family):
    model = tiny_model(family)
    x = calib_tokens(4, 24)
    fp = tiny_model(family)
    ref = fp(x).logits.detach()
    fq = A.ForwardQuant(act_bits=4, kv_bits=4, rotated=True)
    Q1, Q2s, diag = S.learn_rotations(model, x, fq, iters=30, lr=1.0, batch=4, weight_bits=4, seed=0)
    for Q in [Q1, *Q2s]:
        assert _orthogonality_error(Q) < 1e-5
    # the same windows every step (batch = all four): the training loss at the Hadamard start against the end
    assert sum(diag["losses"][-5:]) / 5 < diag["losses"][0]
    S.apply_learned(model, Q1, Q2s)
    A.install(model, A.ForwardQuant(rotated=True))  # full-precision forward: the learned rotations change nothing
    out = model(x).logits.detach()
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max() + 1e-5
    assert not torch.allclose(Q1, S.quarot_rotations(model, 0)[0])  # it did learn


def test_spinquant_job_round_trips(tiny_dir, tmp_path):
    import json

    from quantlib.artifacts.integrity import seal_file
    from quantlib.checkpoint.reader import load_quantized
    from quantlib.jobs.steps import quantize

    calib = tmp_path / "windows.pt"
    torch.save(calib_tokens(8, 32), calib)
    seal_file(calib, calib)
    name = "tiny.toy.n8.L32.spinquant.rtn.w4.a4.kv4.spbs2.spit3.sym"
    quantize(name, tiny_dir, {"calib": calib}, tmp_path / "q", {"device": "cpu", "dtype": "float32"})
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg[A.CONFIG_KEY]["rotated"] is True and cfg["quantization_config"]["spec"] == name
    diag = json.loads((tmp_path / "q" / "diagnostics.json").read_text())
    assert len(diag["preprocess"]["spinquant"]["losses"]) == 3  # the training's cost and losses are recorded
    a, b = load_quantized(tmp_path / "q"), load_quantized(tmp_path / "q")
    x = calib_tokens(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


def test_spinquant_plus_guidedquant_in_memory(tiny_dir, tmp_path):
    # SpinQuant + GuidedQuant (gq1: the saliency of the whole output, unchanged by rotations) through the API
    import quantlib
    from quantlib.checkpoint.reader import load_quantized

    name = "tiny.toy.n8.L32.spinquant.ldlq.w4.a4.gq1.kv4.spbs2.spit3.sym"
    model = quantlib.load_model(tiny_dir)
    report = quantlib.quantize(model, name, calib_tokens(8, 32), progress=False)
    assert all(d["guided_groups"] == 1 for d in report.layers.values())
    quantlib.save(model, name, report, tmp_path / "q", tokenizer_dir=tiny_dir)
    x = calib_tokens(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q")(x).logits, model(x).logits)


def test_cosine_schedule_is_the_references():
    # transformers' cosine schedule without warm-up, as SpinQuant's script selects it: full at the first step, half
    # at the middle, falling all the way
    from quantlib.transforms.spinquant import cosine_lr
    lrs = [cosine_lr(1.5, t, 100) for t in range(100)]
    assert lrs[0] == 1.5 and abs(lrs[50] - 0.75) < 1e-12 and 0 < lrs[99] < 1e-3
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_cayley_step_is_the_reference_optimisers():
    # SGD-G as SpinQuant runs it (momentum 0): the step is the Cayley transform of W = (R^T G - G^T R) / 2 applied to
    # R^T, of length min(lr, 1 / ||W||_1); its first-order move is -a (G - R G^T R) / 2. Written out here with the
    # reference's own fixed-point iteration (to convergence) in place of the exact solve.
    g = torch.Generator().manual_seed(3)
    R, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    for scale, lr in ((1e-3, 1.5), (10.0, 1.5), (10.0, 1e-4)):
        G = torch.randn(16, 16, generator=g, dtype=torch.float64) * scale
        W = 0.5 * (R.T @ G - G.T @ R)
        a = min(lr, 1 / (W.abs().sum(0).max().item() + 1e-8))
        Y = R.T + a * W @ R.T
        for _ in range(200):
            Y = R.T + a * W @ (0.5 * (R.T + Y))
        new = S.cayley_step(R, G, lr)
        assert torch.allclose(new, Y.T, atol=1e-12)
        assert _orthogonality_error(new) < 1e-12
        if scale == 10.0 and lr == 1.5:
            assert a < lr  # the bound binds for large gradients
        small = S.cayley_step(R, G, 1e-6)
        assert torch.allclose((small - R) / 1e-6, -0.5 * (G - R @ G.T @ R), atol=1e-4 * scale)


def test_gradients_are_clipped_together_as_the_references_trainer_does(monkeypatch):
    # transformers' Trainer (max_grad_norm 1.0, which SpinQuant's script keeps) scales R1's and every R2's gradient by
    # one factor, max_norm / global norm: the step must see those gradients, and no clip (0) the raw ones
    x = calib_tokens(2, 16)
    fq = A.ForwardQuant(act_bits=4, kv_bits=4, rotated=True)
    seen = []
    step = S.cayley_step
    monkeypatch.setattr(S, "cayley_step", lambda R, G, lr: seen.append(G.clone()) or step(R, G, lr))
    for clip in (0.0, 0.01):
        seen.clear()
        _, _, diag = S.learn_rotations(tiny_model("llama"), x, fq, iters=1, lr=0.5, batch=2, seed=0, clip=clip)
        norm = torch.sqrt(sum(G.pow(2).sum() for G in seen)).item()
        if clip == 0:
            raw, raw_grads = diag["grad_norms"][0], [G.clone() for G in seen]
            assert abs(norm - raw) < 1e-6 * raw and raw > 0.01
        else:
            assert diag["grad_norms"][0] == pytest.approx(raw)  # the norm before the clip
            assert norm == pytest.approx(0.01, rel=1e-4)
            for G, R in zip(seen, raw_grads):  # one factor for all
                assert torch.allclose(G, R * (0.01 / raw), rtol=1e-4, atol=1e-12)
