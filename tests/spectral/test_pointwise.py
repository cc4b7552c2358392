"""Tests of invseg.spectral.pointwise: the warm-start power method on the connectivity matrix (Thm 3)."""

import pytest
import torch

from invseg.spectral import (
    connectivity_matrix,
    exact_conv_norm,
    pointwise_norm,
    pointwise_norm_exact,
    power_iteration,
)


def _matrix(cout, cin, seed=0):
    return torch.randn(cout, cin, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("cout,cin", [(8, 8), (16, 4), (3, 20), (1, 5)])
@pytest.mark.parametrize("eps", [1e-2, 1e-4, 1e-8])
def test_power_method_reaches_eps(cout, cin, eps):
    a = _matrix(cout, cin, seed=cout * cin)
    v, it = power_iteration(a, eps=eps, max_iter=10000)
    assert it < 10000
    assert v.shape == (cin,) and float(v.norm()) == pytest.approx(1.0, rel=1e-12)
    w = a.t() @ (a @ v)
    sigma2 = float(v @ w)
    assert float((w - sigma2 * v).norm()) <= eps * sigma2  # the stopping rule holds at the returned v
    exact = float(torch.linalg.matrix_norm(a, ord=2))
    sigma = float((a @ v).norm())
    assert sigma <= exact * (1 + 1e-12)  # converges from below
    assert sigma >= exact * (1 - eps)


def test_warm_start_converges_at_once():
    a = _matrix(12, 9, seed=1)
    v, it = power_iteration(a, eps=1e-6, max_iter=1000)
    assert it > 1
    v2, it2 = power_iteration(a, v, eps=1e-6)
    assert it2 == 1
    torch.testing.assert_close(v2, v, rtol=0, atol=1e-5)


def test_check_every_still_stops():
    a = _matrix(10, 10, seed=2)
    _, it1 = power_iteration(a, eps=1e-6, max_iter=1000)
    _, it5 = power_iteration(a, eps=1e-6, max_iter=1000, check_every=5)
    assert it5 % 5 == 0 and it1 <= it5 < it1 + 5


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 1), (6, 4, 1, 1), (6, 4, 1, 1, 1)])
def test_pointwise_norm_any_spatial_dims(shape):
    w = _matrix(6, 4, seed=3).reshape(shape)
    sigma, v = pointwise_norm(w, eps=1e-10, max_iter=10000)
    exact = float(torch.linalg.matrix_norm(_matrix(6, 4, seed=3), ord=2))
    assert float(sigma) == pytest.approx(exact, rel=1e-8)
    assert v.shape == (4,) and not v.requires_grad
    s_exact, v_exact = pointwise_norm(w, exact=True)
    assert float(s_exact) == pytest.approx(exact, rel=1e-12)
    assert abs(float(v_exact @ v)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("d,stride", [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2)])
def test_pointwise_conv_norm_is_matrix_norm(d, stride):
    # Thm 3: a 1x..x1 conv has the norm of its Cout x Cin matrix; a strided one is a subsampling after it
    w = _matrix(3, 2, seed=d).reshape(3, 2, *([1] * d))
    n = {1: 8, 2: 4, 3: 3}[d]
    exact = exact_conv_norm(w, n, stride=stride, padding=0)
    assert exact == pytest.approx(float(torch.linalg.matrix_norm(w.reshape(3, 2), ord=2)), rel=1e-10)


def test_sigma_is_differentiable_with_frozen_v():
    a = _matrix(5, 7, seed=4)
    v, _ = power_iteration(a, eps=1e-12, max_iter=10000)
    w = a.clone().requires_grad_(True)
    sigma, v2 = pointwise_norm(w, v, eps=1e-12)
    sigma.backward()
    u = (a @ v2) / (a @ v2).norm()
    torch.testing.assert_close(w.grad, torch.outer(u, v2), rtol=1e-8, atol=1e-10)  # d||Av||/dA = u vᵀ


def test_exact_norm_gradient_is_top_singular_pair():
    a = _matrix(6, 5, seed=5).requires_grad_(True)
    s, vh = pointwise_norm_exact(a)
    s.backward()
    uu, ss, vv = torch.linalg.svd(a.detach())
    torch.testing.assert_close(a.grad, torch.outer(uu[:, 0], vv[0]), rtol=1e-8, atol=1e-10)
    assert float(s.detach()) == pytest.approx(float(ss[0]), rel=1e-12)


def test_zero_matrix_gives_zero_without_nan():
    sigma, v = pointwise_norm(torch.zeros(3, 4))
    assert float(sigma) == 0.0 and torch.isfinite(v).all()


@pytest.mark.parametrize(
    "weight,needle",
    [(torch.randn(4, 3, 3, 3), "(4, 3, 3, 3)"), (torch.randn(4), "(4,)"), (torch.randn(2, 3, 1, 2), "(2, 3, 1, 2)")],
)
def test_bad_weight_shape_raises(weight, needle):
    with pytest.raises(ValueError) as err:
        pointwise_norm(weight)
    assert needle in str(err.value)
    with pytest.raises(ValueError):
        connectivity_matrix(weight)


@pytest.mark.parametrize("kwargs,needle", [(dict(eps=0.0), "0.0"), (dict(eps=-1.0), "-1.0"), (dict(max_iter=0), "0")])
def test_bad_power_arguments_raise(kwargs, needle):
    with pytest.raises(ValueError) as err:
        power_iteration(torch.randn(3, 3), **kwargs)
    assert needle in str(err.value)


# -- the certificate (DESIGN §1g) -----------------------------------------------------------------------

from invseg.spectral import (  # noqa: E402
    certified_pointwise_norm,
    exact_deflated,
    exact_top_pair,
    rayleigh_bound,
    rotate_deflated,
)


def _deflated_norm2(b: torch.Tensor, v: torch.Tensor) -> float:
    """max_{x ⊥ v, |x| = 1} xᵀBx, by an orthonormal basis of v⊥ (float64)."""
    n = b.shape[0]
    q, _ = torch.linalg.qr(torch.cat([v[:, None], torch.randn(n, n - 1, dtype=b.dtype)], dim=1))
    q = q[:, 1:]
    return float(torch.linalg.eigvalsh(q.t() @ b @ q)[-1])


def _random_case(trial):
    gen = torch.Generator().manual_seed(trial)
    n, m = int(torch.randint(2, 8, (1,), generator=gen)), int(torch.randint(1, 8, (1,), generator=gen))
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if trial % 3 == 0 and min(m, n) > 1:  # nearly equal top singular values
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        s[0], s[1] = 1.0, 1.0 - 10.0 ** -(1 + trial % 7)
        w = (u * s) @ vh
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    return w, v / v.norm()


def test_rayleigh_bound_is_an_upper_bound_and_second_order():
    for trial in range(300):
        w, v = _random_case(trial)
        b = w.t() @ w
        lam = float(torch.linalg.eigvalsh(b)[-1])
        z = b @ v
        rho = v @ z
        resid = (z - rho * v).norm()
        c = torch.tensor(_deflated_norm2(b, v), dtype=torch.float64) if w.shape[1] > 1 else torch.zeros(())
        mu = float(rayleigh_bound(rho, resid, c))
        assert mu >= lam * (1 - 1e-12)
        assert mu <= max(float(rho), float(c)) + float(resid) + 1e-12  # at most max(ρ, c) + r
    # second order: from a vector close to the top one the bound is within r²/(ρ − c) of the truth
    b = torch.diag(torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64))
    v = torch.tensor([1.0, 1e-3, 0.0], dtype=torch.float64)
    v = v / v.norm()
    z = b @ v
    rho, resid = v @ z, (z - (v @ z) * v).norm()
    mu = rayleigh_bound(rho, resid, torch.tensor(_deflated_norm2(b, v), dtype=torch.float64))
    assert 4.0 <= float(mu) <= 4.0 + 1e-5


def test_rotated_deflated_bound_holds_for_any_nearby_vector():
    for trial in range(300):
        w, v = _random_case(trial)
        if w.shape[1] < 2:
            continue
        b = w.t() @ w
        z = b @ v
        rho = v @ z
        resid = (z - rho * v).norm()
        c = torch.tensor(_deflated_norm2(b, v), dtype=torch.float64)
        gen = torch.Generator().manual_seed(10_000 + trial)
        for target in (z / z.norm(), v + 0.3 * torch.randn(v.shape, generator=gen, dtype=torch.float64),
                       torch.randn(v.shape, generator=gen, dtype=torch.float64)):
            target = target / target.norm()
            sin = (1 - (v @ target) ** 2).clamp_min(0).sqrt()
            c2 = float(rotate_deflated(rho, resid, c, sin))
            assert c2 >= _deflated_norm2(b, target) - 1e-12 * float(torch.linalg.eigvalsh(b)[-1])


def test_exact_top_pair_and_deflated_for_any_vector():
    for trial in range(200):
        w, v = _random_case(trial)
        lam1, lam2, v1 = exact_top_pair(w)
        s = torch.linalg.svdvals(w)
        assert float(lam1) == pytest.approx(float(s[0]) ** 2, rel=1e-10)
        assert float(lam2) == pytest.approx(float(s[1]) ** 2 if len(s) > 1 else 0.0, rel=1e-8, abs=1e-12)
        assert float((w @ v1).norm()) == pytest.approx(float(s[0]), rel=1e-8)
        if w.shape[1] > 1:
            b = w.t() @ w
            assert float(exact_deflated(lam1, lam2, v1, v)) >= _deflated_norm2(b, v) - 1e-10 * float(lam1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_certified_pointwise_norm_is_an_upper_bound(dtype):
    for trial in range(100):
        w, _ = _random_case(trial)
        bound, v = certified_pointwise_norm(w.to(dtype))
        exact = float(torch.linalg.matrix_norm(w.to(dtype).double(), ord=2))
        assert exact <= float(bound) <= exact * (1 + 1e-2)
