"""Production token merges (tokenfuse.exporter.methods) against the independent NumPy reference
in tests/reference.py, on fresh seeded random inputs.

Two kinds of inputs:

* continuous: clustered random metrics. float32 (production) and float64 (reference) may
  legitimately disagree when two keys are closer than float32 rounding, so each batch element is
  redrawn (deterministically: the attempt number is part of the seed) until every decision the
  reference took has a margin of at least ``GAP`` (see ``reference_plan(..., return_info=True)``).
* ties: metric rows drawn from a few +-1 vectors (cosines are exact dyadic numbers in float32 and
  float64 alike), so many scores tie exactly and the tie-breaking conventions decide the result.
  PiToMe energies go through exp(), whose vectorised CPU implementation can differ in the last
  bit from the scalar one used at a tensor's tail, so equal tokens could get energies an ulp
  apart. PiToMe tie cases therefore stay on the exact branch of the energy: margin 0 and
  nonnegative cosines (rows of four ones among sixteen zeros), where every energy is an exact sum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import apply_slots, reference_merge, reference_plan

GAP = 3e-6             # decisions closer than this are left to float32 rounding -> redraw
MAX_ATTEMPTS = 200
NUM_LAYERS = 12
LAYERS = [0, 3, 5, 6, 7, 9, 11]  # both halves (bsm-early switches at NUM_LAYERS // 2)
SEEDS = [0, 1, 2]
C = 5                   # channels of x

# (method, pitome_variant)
VARIANTS = [
    ("tome", "plain"),
    ("turbo", "plain"),
    ("crossget", "plain"),
    ("pitome", "plain"),
    ("pitome", "bsm-early"),
    ("pitome", "text"),
]
VARIANT_IDS = [m if m != "pitome" else f"pitome-{v}" for m, v in VARIANTS]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tensors here are tiny; intra-op threads only add contention (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _methods():
    from tokenfuse.exporter.methods import MethodConfig, match
    return MethodConfig, match


def r_max(method, n, protected):
    return n - protected - 1 if method == "crossget" else (n - protected) // 2


def r_values(method, n, protected):
    hi = r_max(method, n, protected)
    small = min(hi, max(2, hi // 3))
    return sorted({1, small, hi})


def _case_seed(*parts):
    return [int(p) & 0xFFFFFFFF for p in parts]


def _variant_code(method, variant):
    return VARIANTS.index((method, variant))


# ------------------------------------------------------------------------------------------------
# input generators (one batch element each)
# ------------------------------------------------------------------------------------------------

def _continuous_metric(rng, n):
    d = int(rng.choice([4, 8, 16]))
    k = int(rng.integers(3, 9))
    centers = rng.normal(size=(k, d))
    weights = rng.dirichlet(np.full(k, 0.7))
    labels = rng.choice(k, size=n, p=weights)
    sigma = np.exp(rng.uniform(np.log(0.03), np.log(1.0), size=(n, 1)))
    return (centers[labels] + sigma * rng.normal(size=(n, d))).astype(np.float32)


def _continuous_cls_attn(rng, n):
    logits = 2.0 * rng.normal(size=n)
    p = np.exp(logits - logits.max())
    return (p / p.sum()).astype(np.float32)


def _ties_metric(rng, n, nonnegative=False):
    d = 16
    k = int(rng.integers(2, 6))
    if nonnegative:  # four ones each: norm 2, cosines exact multiples of 1/4 in [0, 1]
        vecs = np.zeros((k, d))
        for row in vecs:
            row[rng.choice(d, size=4, replace=False)] = 1.0
    else:
        vecs = rng.choice([-1.0, 1.0], size=(k, d))
    labels = rng.integers(0, k, size=n)
    return vecs[labels].astype(np.float32)        # norm 4: cosines are exact multiples of 1/8


def exact_energy(method, cfg_kw):
    """Settings for PiToMe tie cases that keep every energy an exact sum (see the module doc)."""
    return {**cfg_kw, "margin": 0.0} if method == "pitome" else cfg_kw


def _ties_cls_attn(rng, n):
    return (rng.integers(0, 3, size=n) / 64.0).astype(np.float32)   # exact, 30*a exact too


def _x_size(rng, bsz, n):
    x = rng.normal(size=(bsz, n, C)).astype(np.float32)
    size = rng.integers(1, 5, size=(bsz, n, 1)).astype(np.float32)
    return x, size


def make_inputs(seed, method, variant, bsz, n, protected, r, layer, *, ties, cfg_kw=None):
    """Returns float32 numpy arrays (x, metric, size, cls_attn-or-None) and the reference slots."""
    cfg_kw = cfg_kw or {}
    metrics, attns, slots = [], [], []
    code = _variant_code(method, variant)
    for b in range(bsz):
        for attempt in range(MAX_ATTEMPTS):
            rng = np.random.default_rng(_case_seed(seed, b, attempt, n, protected, r, layer, code,
                                                   int(ties), 1234))
            if ties:
                m = _ties_metric(rng, n, nonnegative=method == "pitome")[None]
            else:
                m = _continuous_metric(rng, n)[None]
            a = None
            if method == "turbo":
                a = (_ties_cls_attn if ties else _continuous_cls_attn)(rng, n)[None]
            slot, info = reference_plan(
                method, m.astype(np.float64), r, protected=protected, layer=layer,
                num_layers=cfg_kw.get("num_layers", NUM_LAYERS), cls_attn=a,
                pitome_variant=variant, return_info=True,
                **{k: v for k, v in cfg_kw.items() if k != "num_layers"})
            if info["min_gap"] > GAP and not info["inexact_tie"]:
                break
        else:
            raise AssertionError(f"no well-separated input found for {method}/{variant} "
                                 f"n={n} p={protected} r={r} layer={layer}")
        metrics.append(m[0])
        slots.append(slot[0])
        attns.append(None if a is None else a[0])
    # pad metrics of different widths (continuous draws pick D per element) to a common D
    d = max(mm.shape[1] for mm in metrics)
    metric = np.zeros((bsz, n, d), dtype=np.float32)
    for b, mm in enumerate(metrics):
        metric[b, :, : mm.shape[1]] = mm     # zero columns change neither norms nor dot products
    cls_attn = None if method != "turbo" else np.stack(attns)
    rng = np.random.default_rng(_case_seed(seed, n, protected, r, layer, code, 99))
    x, size = _x_size(rng, bsz, n)
    return x, metric, size, cls_attn, np.stack(slots)


# ------------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------------

CFG_DEFAULTS = dict(margin=0.9, alpha=1.0, turbo_alpha=1.0, turbo_beta=1.0, turbo_gamma=0.0)


def run_production(method, variant, x, metric, size, r, protected, layer, cls_attn,
                   num_layers=NUM_LAYERS, **cfg_kw):
    MethodConfig, match = _methods()
    kw = dict(CFG_DEFAULTS)
    kw.update(cfg_kw)
    cfg = MethodConfig(name=method, pitome_variant=variant, **kw)
    cls_t = None if cls_attn is None else torch.from_numpy(cls_attn)
    tm = match(cfg, torch.from_numpy(metric), r, protected=protected, layer=layer,
               num_layers=num_layers, cls_attn=cls_t)
    x_out, s_out = tm.merge(torch.from_numpy(x), torch.from_numpy(size))
    return tm, x_out, s_out


def check_case(method, variant, x, metric, size, r, protected, layer, cls_attn, want_slot=None,
               num_layers=NUM_LAYERS, **cfg_kw):
    """Production vs reference on one input. ``want_slot`` (the reference plan, when the caller
    already has it) saves recomputing it."""
    bsz, n, _ = x.shape
    kw = dict(CFG_DEFAULTS)
    kw.update(cfg_kw)
    ref_kw = dict(protected=protected, layer=layer, num_layers=num_layers,
                  cls_attn=None if cls_attn is None else cls_attn.astype(np.float64),
                  pitome_variant=variant, **kw)
    if r == 0:
        want_x, want_s = reference_merge(method, x, metric, size, 0, **ref_kw)
    else:
        if want_slot is None:
            want_slot = reference_plan(method, metric.astype(np.float64), r, **ref_kw)
        want_x, want_s = apply_slots(x, size, want_slot, n - r)
    tm, got_x, got_s = run_production(method, variant, x, metric, size, r, protected, layer,
                                      cls_attn, num_layers=num_layers, **cfg_kw)
    where = f"{method}/{variant} B={bsz} N={n} p={protected} r={r} layer={layer} cfg={cfg_kw}"
    assert tuple(got_x.shape) == (bsz, n - r, C), where
    assert tuple(got_s.shape) == (bsz, n - r, 1), where
    if r > 0:
        got_slot = tm.dst_slot.detach().cpu().numpy()
        if not np.array_equal(got_slot, want_slot):
            bad = np.argwhere(got_slot != want_slot)
            b = int(bad[0, 0])
            raise AssertionError(
                f"dst_slot differs ({len(bad)} tokens) for {where}\n"
                f"batch {b}: first bad tokens {bad[bad[:, 0] == b][:8, 1].tolist()}\n"
                f"want {want_slot[b].tolist()}\n got {got_slot[b].tolist()}")
    np.testing.assert_array_equal(got_s.detach().cpu().numpy().astype(np.float64), want_s,
                                  err_msg=where)
    np.testing.assert_allclose(got_x.detach().cpu().numpy().astype(np.float64), want_x,
                               rtol=0, atol=1e-5, err_msg=where)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------

def _layer_for(seed, i):
    return LAYERS[(seed * 3 + i) % len(LAYERS)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("protected", [1, 2])
@pytest.mark.parametrize("n", [197, 50, 17, 8])
@pytest.mark.parametrize("bsz", [1, 3])
@pytest.mark.parametrize("method,variant", VARIANTS, ids=VARIANT_IDS)
def test_matches_reference_random(method, variant, bsz, n, protected, seed):
    for i, r in enumerate(r_values(method, n, protected)):
        layer = _layer_for(seed, i + bsz)
        x, metric, size, cls_attn, slot = make_inputs(seed, method, variant, bsz, n, protected,
                                                      r, layer, ties=False)
        check_case(method, variant, x, metric, size, r, protected, layer, cls_attn, slot)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("protected", [1, 2])
@pytest.mark.parametrize("n", [197, 50, 17, 8])
@pytest.mark.parametrize("method,variant", VARIANTS, ids=VARIANT_IDS)
def test_matches_reference_ties(method, variant, n, protected, seed):
    bsz = 3 if n < 197 else 1 + seed % 3
    for i, r in enumerate(r_values(method, n, protected)):
        layer = _layer_for(seed, i)
        cfg_kw = exact_energy(method, {})
        x, metric, size, cls_attn, slot = make_inputs(seed, method, variant, bsz, n, protected,
                                                      r, layer, ties=True, cfg_kw=cfg_kw)
        check_case(method, variant, x, metric, size, r, protected, layer, cls_attn, slot, **cfg_kw)


@pytest.mark.parametrize("method,variant", VARIANTS, ids=VARIANT_IDS)
def test_reference_merge_is_plan_plus_weighted_mean(method, variant):
    """Self-check of the reference: reference_merge == shared merge applied to reference_plan,
    and the shared merge conserves total size and the size-weighted sum of x."""
    n, protected, r, layer = 17, 2, 5, 4
    x, metric, size, cls_attn, slot = make_inputs(1, method, variant, 2, n, protected, r, layer,
                                                  ties=False)
    kw = dict(protected=protected, layer=layer, cls_attn=cls_attn, pitome_variant=variant)
    want_x, want_s = reference_merge(method, x, metric, size, r, **kw)
    np.testing.assert_array_equal(reference_plan(method, metric, r, **kw), slot)
    ax, as_ = apply_slots(x, size, slot, n - r)
    np.testing.assert_allclose(want_x, ax, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(want_s, as_)
    np.testing.assert_allclose((want_x * want_s).sum(1), (x.astype(np.float64) * size).sum(1),
                               atol=1e-9)
    np.testing.assert_array_equal(want_s.sum(1), size.sum(1))
    np.testing.assert_array_equal(want_x[:, :protected], x[:, :protected])


@pytest.mark.parametrize("variant", ["plain", "bsm-early", "text"])
def test_pitome_identical_tokens_tie_by_position(variant):
    """Minimal hand-checkable tie case. Tokens 3, 4, 5 have the same metric row, so their energies
    are equal; they outrank tokens 1, 2 (smaller cluster), and the tie goes to the lower position:
    energy ranking [3, 4, 5, 1, 2]. Margin 0 and orthogonal nonnegative rows keep the energies
    exact sums (plain: 3/5 and 2/5). Layer 4, r = 1:
      plain:     A = {3}, B = {4}; 3 merges into 4. Output: CLS, rest [5, 1, 2], B [4]
                 -> dst_slot [0, 2, 3, 4, 4, 1].
      bsm-early: (4 < 12 // 2 -> BSM) A = [3, 5, 2], B = [4, 1]; all best scores are 1, tie ->
                 lower energy rank, so 3 merges into 4. Output: CLS, kept A [5, 2], B [4, 1]
                 -> dst_slot [0, 4, 2, 3, 3, 1].
      text:      Gaussian energy, same ranking; A = {3}, B = {4} -> [0, 2, 3, 4, 4, 1].
    """
    v0 = [1, 1, 1, 1] + [0] * 12
    v1 = [0] * 4 + [1, 1, 1, 1] + [0] * 8
    metric = np.array([[v1, v1, v1, v0, v0, v0]], dtype=np.float32)
    n, r, layer = 6, 1, 4
    want = reference_plan("pitome", metric, r, protected=1, layer=layer, pitome_variant=variant, margin=0.0)
    hand = {"plain": [[0, 2, 3, 4, 4, 1]], "bsm-early": [[0, 4, 2, 3, 3, 1]],
            "text": [[0, 2, 3, 4, 4, 1]]}[variant]
    np.testing.assert_array_equal(want, hand)   # the reference agrees with the hand derivation
    rng = np.random.default_rng(3)
    x, size = _x_size(rng, 1, n)
    check_case("pitome", variant, x, metric, size, r, 1, layer, None, want, margin=0.0)


@pytest.mark.parametrize("runtime", ["pytorch", "onnxruntime"])
def test_pitome_equal_metric_rows_get_equal_energies(runtime, tmp_path):
    """Random (inexact) metrics with repeated rows at positions of every alignment: a reduction
    that treats rows differently (ONNX Runtime's ReduceSum over an unpadded row, PyTorch's GEMV)
    gives equal rows energies an ulp apart, and the tie would no longer break by position."""
    from tokenfuse.exporter.methods import LayerRule, pitome_energy, prepare

    rule = LayerRule("pitome", margin=0.6)
    energy = lambda metric: pitome_energy(*prepare(metric, 1, None, None), rule, None)  # noqa: E731
    if runtime == "onnxruntime":
        ort = pytest.importorskip("onnxruntime")

        class Energy(torch.nn.Module):
            def forward(self, metric):
                return energy(metric)
    generator = torch.Generator().manual_seed(5)
    pairs = 0
    for n in (37, 100, 197):
        metric = torch.randn(2, n, 64, generator=generator)
        copies = torch.randint(1, n, (12, 2), generator=generator)
        for source, target in copies.tolist():
            metric[:, target] = metric[:, source]
        if runtime == "pytorch":
            got = energy(metric)
        else:
            path = tmp_path / f"energy{n}.onnx"
            torch.onnx.export(Energy(), (metric,), str(path), dynamo=False, opset_version=18, input_names=["metric"])
            got = torch.from_numpy(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"metric": metric.numpy()})[0])
        for b in range(2):
            for i in range(1, n):
                for j in range(i + 1, n):
                    if torch.equal(metric[b, i], metric[b, j]):
                        pairs += 1
                        assert got[b, i] == got[b, j], (n, b, i, j)
    assert pairs >= 50


def test_crossget_mutual_nearest_neighbours_tie_by_position():
    """Two mutual nearest neighbours have the same redundancy (S is symmetric), so the lower
    position ranks first, sees the other as a lower-ranked candidate, and becomes the source.
    Here tokens 2 and 4 are mutual nearest neighbours with the top redundancy (S_24 ~ 0.2625):
    token 2 merges into token 4 -> dst_slot [0, 1, 3, 2, 3]. (In float32, torch's matmul gives
    S[4, 2] one ulp above S[2, 4] for this input, so an implementation that does not keep S
    exactly symmetric ranks token 4 first and merges 4 into 2 instead.)"""
    metric = np.random.default_rng([5, 16, 21]).normal(size=(1, 5, 16)).astype(np.float32)
    m = metric[0].astype(np.float64)
    mn = m / np.linalg.norm(m, axis=1, keepdims=True)
    cos = mn @ mn.T
    np.fill_diagonal(cos, -np.inf)
    assert int(np.argmax(cos[2, 1:])) + 1 == 4 and int(np.argmax(cos[4, 1:])) + 1 == 2
    want = reference_plan("crossget", metric, 1, protected=1)
    np.testing.assert_array_equal(want, [[0, 1, 3, 2, 3]])
    x, size = _x_size(np.random.default_rng(0), 1, 5)
    check_case("crossget", "plain", x, metric, size, 1, 1, 0, None, want)


def test_ties_inputs_really_tie():
    """Sanity check of the generator: the ties inputs produce many exactly equal scores."""
    rng = np.random.default_rng(0)
    m = _ties_metric(rng, 50).astype(np.float64)
    mn = m / np.linalg.norm(m, axis=1, keepdims=True)
    cos = mn @ mn.T
    assert len(np.unique(cos)) <= 17
    assert np.all(cos * 8 == np.round(cos * 8))


@pytest.mark.parametrize("method,variant,cfg_kw", [
    ("pitome", "plain", dict(margin=0.75, alpha=0.5)),
    ("pitome", "bsm-early", dict(margin=0.75, alpha=1.0, num_layers=24)),
    ("pitome", "text", dict(margin=0.95, num_layers=24)),
    ("turbo", "plain", dict(turbo_alpha=5.0)),
    ("turbo", "plain", dict(turbo_alpha=2.0, turbo_beta=0.8, turbo_gamma=3.0)),
], ids=["pitome-m075-a05", "pitome-bsm-L24", "pitome-text-m095-L24", "turbo-a5", "turbo-a2-b08-g3"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_reference_other_settings(method, variant, cfg_kw, ties, seed):
    if ties:
        cfg_kw = exact_energy(method, cfg_kw)
    num_layers = cfg_kw.get("num_layers", NUM_LAYERS)
    for n, protected in [(50, 1), (17, 2)]:
        for i, r in enumerate(r_values(method, n, protected)):
            layer = [0, num_layers // 2 - 1, num_layers // 2, num_layers - 1][(seed + i) % 4]
            x, metric, size, cls_attn, slot = make_inputs(seed, method, variant, 2, n, protected,
                                                          r, layer, ties=ties, cfg_kw=cfg_kw)
            kw = {k: v for k, v in cfg_kw.items() if k != "num_layers"}
            check_case(method, variant, x, metric, size, r, protected, layer, cls_attn, slot,
                       num_layers=num_layers, **kw)


@pytest.mark.parametrize("protected", [1, 2])
@pytest.mark.parametrize("n", [50, 17])
@pytest.mark.parametrize("method,variant", VARIANTS, ids=VARIANT_IDS)
def test_r_zero_is_identity(method, variant, n, protected):
    rng = np.random.default_rng(_case_seed(n, protected, _variant_code(method, variant), 7))
    x, size = _x_size(rng, 2, n)
    metric = rng.normal(size=(2, n, 8)).astype(np.float32)
    cls_attn = np.stack([_continuous_cls_attn(rng, n) for _ in range(2)]) if method == "turbo" \
        else None
    want_x, want_s = reference_merge(method, x, metric, size, 0, protected=protected,
                                     cls_attn=cls_attn, pitome_variant=variant)
    np.testing.assert_array_equal(want_x, x.astype(np.float64))
    tm, got_x, got_s = run_production(method, variant, x, metric, size, 0, protected, 3,
                                      cls_attn)
    np.testing.assert_array_equal(tm.dst_slot.numpy(), np.broadcast_to(np.arange(n), (2, n)))
    np.testing.assert_array_equal(got_s.numpy(), size)
    np.testing.assert_allclose(got_x.numpy(), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("protected", [1, 2])
@pytest.mark.parametrize("n", [197, 50, 17, 8])
@pytest.mark.parametrize("method,variant", VARIANTS, ids=VARIANT_IDS)
def test_dst_slot_is_onto(method, variant, n, protected, ties):
    """Every input token goes to a slot in [0, N-r), every slot receives at least one token, and
    the protected tokens keep slots 0..protected-1."""
    bsz = 3
    for i, r in enumerate(r_values(method, n, protected)):
        layer = LAYERS[(i + n) % len(LAYERS)]
        rng = np.random.default_rng(_case_seed(n, protected, r, layer, int(ties), 5))
        if ties:
            metric = np.stack([_ties_metric(rng, n) for _ in range(bsz)])
        else:
            metric = rng.normal(size=(bsz, n, 8)).astype(np.float32)
        cls_attn = None
        if method == "turbo":
            cls_attn = np.stack([(_ties_cls_attn if ties else _continuous_cls_attn)(rng, n)
                                 for _ in range(bsz)])
        x, size = _x_size(rng, bsz, n)
        tm, _, _ = run_production(method, variant, x, metric, size, r, protected, layer,
                                  cls_attn)
        slot = tm.dst_slot
        assert slot.dtype == torch.long
        assert tuple(slot.shape) == (bsz, n)
        slot = slot.numpy()
        assert slot.min() >= 0 and slot.max() < n - r, (r, slot.min(), slot.max())
        for b in range(bsz):
            counts = np.bincount(slot[b], minlength=n - r)
            assert np.all(counts >= 1), f"empty slots {np.flatnonzero(counts == 0).tolist()}"
            assert counts.sum() == n
            # exactly r tokens disappear: n - r slots, each non-empty
            np.testing.assert_array_equal(slot[b, :protected], np.arange(protected))
            assert np.all(counts[:protected] == 1)
