"""The compiled-program reader behind the planner's time estimate: FLOPs, HBM bytes and collectives
counted from HLO text, loops multiplied by their trip counts, against sizes worked out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.plan import hlo
from rlhf_jax.plan.roofline import CHIPS, estimate

M, K = 64, 256
MATMUL = 2 * M * K * K  # one [M, K] x [K, K]


def _costs(fn, *args, **jit_kwargs):
    return hlo.program_costs(jax.jit(fn, **jit_kwargs).lower(*args).compile().as_text())


def _fori(x, w):
    return jax.lax.fori_loop(0, 10, lambda i, x: jnp.tanh(x @ w), x)


def _scan(x, ws):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, ws)[0]


def _early_exit(x, w):
    """Decoding's shape of loop: at most 7 steps, or fewer once a data-dependent test fails."""
    def cond(carry):
        i, x = carry
        return (i < 7) & (jnp.sum(x) < 1e9)
    return jax.lax.while_loop(cond, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, x))[1]


@pytest.mark.parametrize("fn,stacked,trips", [(_fori, False, 10), (_scan, True, 5), (_early_exit, False, 7)])
def test_loop_bodies_count_once_per_trip(fn, stacked, trips):
    x = jax.ShapeDtypeStruct((M, K), jnp.float32)
    w = jax.ShapeDtypeStruct((5, K, K) if stacked else (K, K), jnp.float32)
    costs = _costs(fn, x, w)
    assert costs.flops == trips * MATMUL
    assert [loop["trips"] for loop in costs.loops] == [trips]
    assert costs.loops[0]["flops"] == MATMUL
    # XLA's own count has the body once.
    xla = jax.jit(fn).lower(x, w).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    assert xla["flops"] < 1.1 * MATMUL


def test_a_loop_from_a_constant_start_counts_its_own_steps():
    """Decoding in segments: each loop's counter starts where the last one ended (a constant)."""
    def from_three(x, w):
        def cond(carry):
            i, x = carry
            return (i < 10) & (jnp.sum(x) < 1e9)
        return jax.lax.while_loop(cond, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (3, x))[1]
    costs = _costs(from_three, jnp.zeros((M, K)), jnp.zeros((K, K)))
    assert [loop["trips"] for loop in costs.loops] == [7]
    assert costs.flops == 7 * MATMUL


def test_nested_loops_multiply():
    def nested(x, w):
        return jax.lax.fori_loop(0, 3, lambda i, x: _fori(x, w), x)
    costs = _costs(nested, jnp.zeros((M, K)), jnp.zeros((K, K)))
    assert costs.flops == 30 * MATMUL


def test_hbm_bytes_of_an_elementwise_pass_and_an_in_place_update():
    big = jnp.zeros((1024, 1024), jnp.float32)
    # one read and one write of 4 MiB
    assert _costs(lambda x: jnp.tanh(x) * 2, big).hbm_bytes == pytest.approx(2 * big.nbytes, rel=0.01)

    def write_rows(buf, rows):
        def body(i, buf):
            return jax.lax.dynamic_update_slice(buf, rows[i][None], (i, 0))
        return jax.lax.fori_loop(0, 8, body, buf)
    costs = _costs(write_rows, big, jnp.zeros((8, 1024)), donate_argnums=0)
    # Eight 4 KiB rows written in place: far from eight rewrites of the 4 MiB buffer.
    assert costs.hbm_bytes < 0.5 * big.nbytes, costs.hbm_bytes


def _tpu_mesh():
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]'): no compile-only TPU")
    from rlhf_jax.plan.cli import topology_devices
    return jax.sharding.Mesh(np.asarray(topology_devices("v5e:2x4")[0]), ("d",))


def test_collectives_on_a_tpu_slice():
    mesh = _tpu_mesh()
    x = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("d", None)))
    gathered = _costs(lambda x: x * 2, x, out_shardings=NamedSharding(mesh, P()))
    assert gathered.comm_by_kind["all-gather"] == 1024 * 512 * 2  # each device ends with the whole array

    def psum(x):
        return jax.lax.psum(x, "d")
    summed = _costs(jax.shard_map(psum, mesh=mesh, in_specs=P("d", None), out_specs=P()), x)
    assert summed.comm_by_kind["all-reduce"] == 1024 * 512 * 2 / 8  # each device's block, summed over 8


def test_tpu_matmuls_expressed_as_convolutions_count_exactly():
    mesh = _tpu_mesh()
    x = jax.ShapeDtypeStruct((M * 8, K), jnp.float32, sharding=NamedSharding(mesh, P("d", None)))
    w = jax.ShapeDtypeStruct((K, K), jnp.float32, sharding=NamedSharding(mesh, P(None, "d")))
    costs = _costs(_fori, x, w, out_shardings=NamedSharding(mesh, P("d", None)))
    assert costs.flops == 10 * MATMUL  # per device: its 64 rows
    batched = _costs(lambda q, k: jnp.einsum("bhsd,bhtd->bhst", q, k),
                     jax.ShapeDtypeStruct((8, 4, 32, 16), jnp.bfloat16), jax.ShapeDtypeStruct((8, 4, 48, 16), jnp.bfloat16))
    assert batched.flops == 2 * 8 * 4 * 32 * 48 * 16


def test_windowed_matmul_loops_count_two_steps_per_trip():
    """XLA's collective matmul on 16 chips: a loop whose counter goes 0, 2, ..., 6 < 8 (four trips),
    each trip two chunks' products. Counted as eight trips, the FLOPs came out doubled."""
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]'): no compile-only TPU")
    from rlhf_jax.plan.cli import topology_devices
    mesh = jax.sharding.Mesh(np.asarray(topology_devices("v5e:4x4")[0]), ("d",))
    x = jax.ShapeDtypeStruct((64, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "d")))
    w = jax.ShapeDtypeStruct((4096, 32768), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "d")))
    costs = _costs(lambda x, w: x @ w, x, w, out_shardings=NamedSharding(mesh, P(None, "d")))
    assert costs.flops == 2 * 64 * 4096 * 32768 / 16


def test_parses_async_collectives_and_trip_counts_from_text():
    text = """HloModule m

%cond (p: (s32[], bf16[8,128])) -> pred[] {
  %p = (s32[], bf16[8,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.1: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %p.1 = (s32[], bf16[8,128]) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %x = bf16[8,128]{1,0} get-tuple-element(%p.1), index=1
  %ag = (bf16[8,128]{1,0}, bf16[64,128]{1,0}) all-gather-start(%x), dimensions={0}
  %agd = bf16[64,128]{1,0} all-gather-done(%ag)
  %ar = bf16[8,128]{1,0} all-reduce(%x), to_apply=%add
  %one = s32[] constant(1)
  %i.2 = s32[] add(%i.1, %one)
  ROOT %t = (s32[], bf16[8,128]) tuple(%i.2, %ar)
}

ENTRY %main (a: bf16[8,128]) -> bf16[8,128] {
  %a = bf16[8,128]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8,128]) tuple(%zero, %a)
  %w = (s32[], bf16[8,128]) while(%init), condition=%cond, body=%body, metadata={op_name="jit(f)/while"}
  ROOT %out = bf16[8,128]{1,0} get-tuple-element(%w), index=1
}
"""
    costs = hlo.program_costs(text)
    assert costs.loops == [{"op_name": "jit(f)/while", "trips": 12, "flops": 0.0,
                            "hbm_bytes": costs.loops[0]["hbm_bytes"],
                            "comm_bytes": 64 * 128 * 2 + 8 * 128 * 2,
                            "comm_by_kind": {"all-gather": 64 * 128 * 2, "all-reduce": 8 * 128 * 2,
                                             "reduce-scatter": 0.0, "all-to-all": 0.0, "collective-permute": 0.0}}]
    assert costs.comm_by_kind["all-gather"] == 12 * 64 * 128 * 2
    assert costs.unknown_trip_counts == 0


def test_a_nested_fusion_that_slices_a_stacked_buffer_reads_only_its_slice():
    """XLA:TPU fuses a layer's slice of a stacked KV cache ([layers, ...]) into the attention's
    matmul as a fusion inside a fusion: the layer's 2 KiB are read, not the 64 KiB stack."""
    text = """HloModule m

%slice_it (s: f32[32,4,128]) -> f32[4,128] {
  %s = f32[32,4,128]{2,1,0} parameter(0)
  %sl = f32[1,4,128]{2,1,0} slice(%s), slice={[3:4], [0:4], [0:128]}
  ROOT %b = f32[4,128]{1,0} bitcast(%sl)
}

%outer (p0: f32[32,4,128], p1: f32[4,128]) -> f32[4,128] {
  %p0 = f32[32,4,128]{2,1,0} parameter(0)
  %p1 = f32[4,128]{1,0} parameter(1)
  %inner = f32[4,128]{1,0} fusion(%p0), kind=kLoop, calls=%slice_it
  ROOT %m = f32[4,128]{1,0} multiply(%inner, %p1)
}

ENTRY %main (a: f32[32,4,128], x: f32[4,128]) -> f32[4,128] {
  %a = f32[32,4,128]{2,1,0} parameter(0)
  %x = f32[4,128]{1,0} parameter(1)
  ROOT %f = f32[4,128]{1,0} fusion(%a, %x), kind=kLoop, calls=%outer
}
"""
    layer = 4 * 128 * 4
    # the layer's slice and x read, the product written
    assert hlo.program_costs(text).hbm_bytes == 3 * layer
    # used whole by the nested fusion, the stack is read whole
    whole = text.replace("%sl = f32[1,4,128]{2,1,0} slice(%s), slice={[3:4], [0:4], [0:128]}",
                         "%sl = f32[1,4,128]{2,1,0} reduce(%s), dimensions={0}")
    assert hlo.program_costs(whole).hbm_bytes == 32 * layer + 2 * layer


def test_a_prefetch_into_on_chip_memory_reads_once_and_an_eviction_writes_once():
    """copy-start's result is (destination, source, context): a prefetch (destination in S(1))
    moves its operand's bytes out of HBM once; an eviction writes its destination once."""
    text = """HloModule m

ENTRY %main (a: bf16[1024,512], b: bf16[256,512]) -> bf16[1024,512] {
  %a = bf16[1024,512]{1,0} parameter(0)
  %b = bf16[256,512]{1,0:S(1)} parameter(1)
  %pre = (bf16[1024,512]{1,0:S(1)}, bf16[1024,512]{1,0}, u32[]{:S(2)}) copy-start(%a)
  %pred = bf16[1024,512]{1,0:S(1)} copy-done(%pre)
  %evict = (bf16[256,512]{1,0}, bf16[256,512]{1,0:S(1)}, u32[]{:S(2)}) copy-start(%b)
  %evd = bf16[256,512]{1,0} copy-done(%evict)
  ROOT %r = bf16[1024,512]{1,0:S(1)} negate(%pred)
}
"""
    assert hlo.program_costs(text).hbm_bytes == 1024 * 512 * 2 + 256 * 512 * 2


def test_attributes_over_several_lines_do_not_end_a_computation():
    """A Pallas kernel's custom call carries metadata over several lines, one starting with "}}":
    the matmul after it still counts."""
    text = """HloModule m

ENTRY %main (a: f32[64,256], w: f32[256,256]) -> f32[64,256] {
  %a = f32[64,256]{1,0} parameter(0)
  %w = f32[256,256]{1,0} parameter(1)
  %k = f32[64,256]{1,0} custom-call(%a), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\"block_q\": 512}"
}}, metadata={op_name="splash"}
  ROOT %d = f32[64,256]{1,0} dot(%k, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
    assert hlo.program_costs(text).flops == MATMUL


def test_roofline_names_the_slowest_resource():
    costs = hlo.Costs(flops=197e12, hbm_bytes=819e9 * 2)
    costs.comm_by_kind["all-reduce"] = 100e9  # twice over the links: 200 GB at 400 GB/s
    est = estimate(costs, CHIPS["v5e"])
    assert est["est_bound"] == "hbm" and est["est_s"] == pytest.approx(2.0)
    assert est["compute_s"] == pytest.approx(1.0) and est["ici_s"] == pytest.approx(0.5)
    assert math.isclose(estimate(hlo.Costs(flops=1.0), CHIPS["v4"])["est_s"], 1 / 275e12)
    assert "ici_s" not in estimate(hlo.Costs(), CHIPS["v4"])  # v4 publishes no per-chip ICI figure
