"""examples/train_tiny_gpt.py: every hand-written gradient against finite differences
(float64, NumPy, dropout on), the mixed-precision policies against float64, the training
loop end to end; on a GPU also fp16/bf16 kernels vs float64, bitwise determinism and a
falling loss. The example is imported as a module from its path."""

from __future__ import annotations

import importlib.util
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import cuflash

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_gpt.py"


@pytest.fixture(scope="module")
def tg():
    spec = importlib.util.spec_from_file_location("train_tiny_gpt", _EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _tiny_cfg(tg, *, tie=True, d_model=16, heads=2, context=8, init_std=0.3, p_attn=0.25, p_resid=0.2):
    return tg.GPTConfig(vocab_size=11, n_layer=2, d_model=d_model, n_head=heads, context=context,
                        attn_dropout=p_attn, resid_dropout=p_resid, tie_embeddings=tie, init_std=init_std)


def _tokens(cfg, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, size=(batch, cfg.context)).astype(np.int32)
    y = rng.integers(0, cfg.vocab_size, size=(batch, cfg.context)).astype(np.int32)
    return x, y


def _perturb_all(model, rng, scale=0.1):
    """Move LayerNorm gains/biases and biases off their init (1 / 0) so every path is generic."""
    model.theta[...] += scale * rng.standard_normal(model.theta.shape).astype(model.theta.dtype)


# ------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_every_gradient_matches_finite_differences(tg, tie):
    """Central differences (eps 1e-6) of the float64 loss, with attention and residual
    dropout on (the masks are pure functions of (seed, offset), so every evaluation sees
    the same ones), against the hand-written backward, for a few entries of every tensor."""
    cfg = _tiny_cfg(tg, tie=tie)
    model = tg.TinyGPT(cfg, tg.Precision(np, "float64"), seed=3, dropout_seed=2024)
    rng = np.random.default_rng(7)
    _perturb_all(model, rng)
    x, y = _tokens(cfg)
    step = 5

    def loss_at():
        return float(model.forward(x, y, train=True, step=step)[0])

    loss, cache = model.forward(x, y, train=True, step=step)
    # The dropout really is on: the same batch without it gives another loss.
    assert abs(float(loss) - float(model.forward(x, y, train=False)[0])) > 1e-3
    model.zero_grad()
    model.backward(cache, 1.0)
    eps, worst = 1e-6, 0.0
    names = [n for n, _, _ in tg.param_specs(cfg)]
    assert set(names) == set(model.params)
    for name in names:
        p, g = model.params[name], model.grads[name].copy()
        mag = np.abs(g).ravel()
        assert mag.max() > 0, f"{name}: gradient is identically zero"
        big = np.flatnonzero(mag >= 0.1 * mag.max())
        picks = set(np.argsort(-mag)[:2].tolist()) | set(rng.choice(big, size=min(2, big.size), replace=False).tolist())
        for flat_i in sorted(picks):
            i = tuple(int(k) for k in np.unravel_index(flat_i, p.shape))
            orig = p[i]
            p[i] = orig + eps
            lp = loss_at()
            p[i] = orig - eps
            lm = loss_at()
            p[i] = orig
            fd = (lp - lm) / (2 * eps)
            err = abs(fd - g[i]) / max(abs(fd), abs(g[i]))
            worst = max(worst, err)
            print(f"{name:12s} {str(i):10s} analytic {g[i]: .9e}  fd {fd: .9e}  rel err {err:.2e}")
            assert err < 1e-5, f"{name}{i}: analytic {g[i]:.9e} vs finite difference {fd:.9e} (rel err {err:.2e})"
    print(f"worst relative error over all sampled entries: {worst:.2e}")


def _loss_and_grad(tg, prec, cfg, theta64, x, y, *, step=1, scale=1.0):
    """Loss and d loss/d theta (unscaled, float64 host) of a model with the given weights."""
    xp = prec.xp
    model = tg.TinyGPT(cfg, prec, seed=0, dropout_seed=99)
    model.theta[...] = xp.asarray(theta64.astype(prec.master))
    model.zero_grad()
    loss, cache = model.forward(xp.asarray(x), xp.asarray(y), train=True, step=step)
    model.backward(cache, scale)
    return float(loss), tg.to_host(model.grad).astype(np.float64) / scale, model


def _compare(tg, cfg, loss_lp, g_lp, loss_64, g_64, label, loss_tol, tensor_tol, global_tol):
    """Print and check the loss and per-tensor gradient errors relative to the float64 norms."""
    offs = np.cumsum([0] + [int(np.prod(s)) for _, s, _ in tg.param_specs(cfg)])
    gnorm = np.linalg.norm(g_64)
    loss_err = abs(loss_lp - loss_64) / abs(loss_64)
    glob = np.linalg.norm(g_lp - g_64) / gnorm
    print(f"{label}: loss {loss_lp:.6f} vs {loss_64:.6f} (rel {loss_err:.2e}); gradient rel err {glob:.2e}")
    bad = []
    for (name, _, _), a, b in zip(tg.param_specs(cfg), offs[:-1], offs[1:]):
        ref = np.linalg.norm(g_64[a:b])
        err = np.linalg.norm(g_lp[a:b] - g_64[a:b]) / max(ref, 1e-2 * gnorm)
        mx = np.max(np.abs(g_lp[a:b] - g_64[a:b]))
        print(f"  {name:12s} |g| {ref:.3e}  rel err {err:.2e}  max abs err {mx:.2e}")
        if not err < tensor_tol:
            bad.append((name, err))
    assert loss_err < loss_tol
    assert glob < global_tol
    assert not bad, f"{label}: gradient errors above {tensor_tol}: {bad}"


@pytest.mark.parametrize("mode", ["float16", "bfloat16", "bfloat16-emulated"])
def test_mixed_precision_policy_on_numpy_matches_float64(tg, mode):
    """The float16 (with a loss scale) and bfloat16 policies, run on NumPy, against the
    float64 model with the same weights and masks: casts, unscaling and the bf16 bit
    conversions are right before any GPU is involved. bfloat16-emulated forces the path
    taken when the matmul cannot multiply bfloat16 arrays (float32 GEMM of rounded operands)."""
    if mode.startswith("bfloat16"):
        pytest.importorskip("ml_dtypes")
    cfg = _tiny_cfg(tg, d_model=32, heads=2, context=16, init_std=0.05)
    x, y = _tokens(cfg, batch=2, seed=1)
    theta64, _ = tg.init_params(cfg, seed=4)
    theta64 = theta64.astype(np.float32).astype(np.float64)  # the weights both models can hold exactly
    l64, g64, _ = _loss_and_grad(tg, tg.Precision(np, "float64"), cfg, theta64, x, y)
    prec = tg.Precision(np, mode.split("-")[0])
    if mode == "bfloat16-emulated":
        prec.bf16_matmul = False
    llp, glp, _ = _loss_and_grad(tg, prec, cfg, theta64, x, y, scale=1024.0 if mode == "float16" else 1.0)
    # measured on NumPy: float16 ~1e-3 per tensor, bfloat16 ~6e-3; the bounds leave ~10x room
    tol = (2e-3, 1e-2, 5e-3) if mode == "float16" else (1e-2, 6e-2, 3e-2)
    _compare(tg, cfg, llp, glp, l64, g64, f"NumPy {mode} ({prec.describe()})", *tol)


def test_bf16_bit_conversions_match_ml_dtypes(tg):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
                        np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.3895314e38, 3.4e38, np.inf, -np.inf,
                                  1e-40, -1e-45], dtype=np.float32)]).astype(np.float32)
    bits = tg.f32_to_bf16_bits(np, x)
    ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(bits, ref)
    assert np.array_equal(tg.bf16_bits_to_f32(np, bits), ref.view(ml_dtypes.bfloat16).astype(np.float32))
    nan_bits = tg.f32_to_bf16_bits(np, np.array([np.nan, np.float32(np.nan) * -1], dtype=np.float32))
    assert np.isnan(tg.bf16_bits_to_f32(np, nan_bits)).all()


def test_optimizer_skips_nonfinite_step_and_backs_off(tg):
    """A float16 step whose gradient overflowed leaves the weights, the moments and the step
    count untouched and halves the loss scale; a finite step moves the weights."""
    cfg = _tiny_cfg(tg, d_model=16, heads=2)
    model = tg.TinyGPT(cfg, tg.Precision(np, "float16"), seed=0)
    opt = tg.AdamW(model, init_scale=1024.0)
    before = model.theta.copy()
    model.grad[...] = 1.0
    model.grad[3] = np.inf
    opt.step(1e-2)
    assert np.array_equal(model.theta, before) and float(opt.t) == 0 and float(opt.scale) == 512.0
    assert float(opt.skipped) == 1
    model.grad[...] = 1.0
    opt.step(1e-2)
    assert float(opt.t) == 1 and not np.array_equal(model.theta, before)
    # clipping: a global norm above grad_clip is scaled down to it before Adam.
    assert float(opt.grad_norm) == pytest.approx(np.sqrt(model.n_params) / 512.0, rel=1e-5)


def test_lr_schedule(tg):
    f = lambda s: tg.lr_at(s, lr=1.0, warmup=10, total=110, min_frac=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_cpu_training_run_writes_outputs(tg, tmp_path, capsys):
    """main(['--cpu', ...]) trains, evaluates, writes loss_curve.json/.png and a sample."""
    rc = tg.main(["--cpu", "--steps", "12", "--log-every", "4", "--eval-every", "8", "--batch", "4",
                  "--context", "32", "--d-model", "32", "--heads", "2", "--sample-chars", "20",
                  "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "attention" in out and "final: train loss" in out
    curve = json.loads((tmp_path / "loss_curve.json").read_text())
    losses = curve["train"]["loss"]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert curve["val"]["step"] == [8, 12]
    assert np.mean(losses[-3:]) < losses[0]
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "sample.txt").read_text()) == 20


def test_builtin_png_writer(tg, tmp_path):
    img = tg.render_curves([([1, 2, 3, 4], [4.0, 3.0, 2.5, 2.2], (31, 119, 180))], width=120, height=80)
    assert img.shape == (80, 120, 3) and (img != 255).any()
    path = tmp_path / "t.png"
    tg.write_png(path, img)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # IHDR then IDAT: decompress the scanlines and compare with the image.
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (w, h) == (120, 80)
    n = int.from_bytes(data[33:37], "big")
    assert data[37:41] == b"IDAT"
    raw = np.frombuffer(zlib.decompress(data[41:41 + n]), np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all() and np.array_equal(raw[:, 1:].reshape(h, w, 3), img)


def test_no_gpu_note(tg, capsys, monkeypatch):
    monkeypatch.setattr(cuflash, "gpu_available", lambda: False)
    assert tg.main(["--steps", "1"]) == 0
    assert "--cpu" in capsys.readouterr().out


# ------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
def test_gpu_model_matches_float64_numpy(tg, cp, mode):
    """The tiny model on the GPU (cuflash kernels, cuBLAS, CuPy masks) against the float64
    NumPy model with identical weights and dropout masks; errors relative to the float64
    gradient norms, with fp16/bf16-sized tolerances."""
    if mode == "bfloat16":
        pytest.importorskip("ml_dtypes")
    cfg = _tiny_cfg(tg, d_model=64, heads=2, context=48, init_std=0.05, p_attn=0.15, p_resid=0.1)
    x, y = _tokens(cfg, batch=3, seed=2)
    theta64, _ = tg.init_params(cfg, seed=5)
    theta64 = theta64.astype(np.float32).astype(np.float64)
    l64, g64, _ = _loss_and_grad(tg, tg.Precision(np, "float64"), cfg, theta64, x, y, step=7)
    prec = tg.Precision(cp, mode)
    llp, glp, _ = _loss_and_grad(tg, prec, cfg, theta64, x, y, step=7, scale=1024.0 if mode == "float16" else 1.0)
    assert np.isfinite(glp).all()
    # The NumPy runs of the same policies (test above) measure ~1e-3 (float16) and ~6e-3
    # (bfloat16) per tensor; the kernels add attention's own rounding on top.
    tol = {"float16": (3e-3, 2e-2, 1e-2), "bfloat16": (1.5e-2, 1e-1, 5e-2)}[mode]
    _compare(tg, cfg, llp, glp, l64, g64, f"GPU {mode} ({prec.describe()})", *tol)


def _gpu_run(tg, cp, mode, *, steps, deterministic, cfg_kw, batch, lr, seed=11):
    ids, chars = tg.load_corpus()
    train_ids, val_ids = tg.split_ids(ids)
    cfg = tg.GPTConfig(vocab_size=len(chars), **cfg_kw)
    model = tg.TinyGPT(cfg, tg.Precision(cp, mode), seed=seed, deterministic=deterministic)
    tc = tg.TrainConfig(steps=steps, batch=batch, lr=lr, warmup=max(1, steps // 6), eval_every=steps,
                        log_every=max(1, steps // 2), eval_batches=2, seed=seed)
    opt = tg.AdamW(model, betas=tc.betas, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)
    hist = tg.train(model, opt, train_ids, val_ids, tc, log=print)
    return hist, cp.asnumpy(model.theta), cp.asnumpy(opt.m), cp.asnumpy(opt.v)


@pytest.mark.gpu
def test_gpu_deterministic_runs_are_bitwise_identical(tg, cp):
    kw = dict(n_layer=2, d_model=64, n_head=2, context=64, attn_dropout=0.1, resid_dropout=0.1)
    a = _gpu_run(tg, cp, "float16", steps=10, deterministic=True, cfg_kw=kw, batch=8, lr=3e-3)
    b = _gpu_run(tg, cp, "float16", steps=10, deterministic=True, cfg_kw=kw, batch=8, lr=3e-3)
    print("losses run 1:", a[0]["step_losses"])
    print("losses run 2:", b[0]["step_losses"])
    diff = np.max(np.abs(a[1].astype(np.float64) - b[1].astype(np.float64)))
    print(f"max |theta_1 - theta_2| = {diff:.3e}")
    assert a[0]["step_losses"] == b[0]["step_losses"]
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["float16", "bfloat16"])
def test_gpu_short_training_run_learns(tg, cp, mode):
    if mode == "bfloat16":
        pytest.importorskip("ml_dtypes")
    kw = dict(n_layer=2, d_model=128, n_head=4, context=64, attn_dropout=0.1, resid_dropout=0.1)
    hist = _gpu_run(tg, cp, mode, steps=60, deterministic=False, cfg_kw=kw, batch=16, lr=3e-3)[0]
    losses = hist["step_losses"]
    first, last = losses[0], float(np.mean(losses[-5:]))
    print(f"{mode}: first loss {first:.3f}, mean of last 5 {last:.3f}, val {hist['final_val_loss']:.3f}, "
          f"{hist['tokens_per_s'] / 1e3:.1f}k tok/s, attention {100 * hist['attn_share']:.1f}%")
    assert np.isfinite(losses).all()
    assert last < 0.8 * first
    assert 0.0 < hist["attn_share"] < 1.0
