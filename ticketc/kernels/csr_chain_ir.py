"""LLVM IR the CPU chain kernel (ticketc.kernels.csr_chain_cpu) writes itself, as Numba
intrinsics built with llvmlite: code whose register use Numba would not get from Python source.

- `make_tile` / `tile4`, `tile2`, `tile1`: a row's sums over a tile of 64, 32 or 16 activation
  columns kept in 16-float vector registers across its entries (fused multiply-adds, four sets of
  sums in flight, added up in a fixed order so results do not depend on the tiling);
- `t16`: a 16 x 16 fp32 block transposed in registers (the chunk transposes of the columns way);
- `f32_at`: an integer address as a float32 pointer (for numba.carray).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["f32_at", "make_tile", "t16", "tile1", "tile2", "tile4"]


def make_tile(vectors: int, sets: int):  # type: ignore[no-untyped-def]
    """An intrinsic tile(o_at, a_at, stride, col_at, val_at, j0, j1, b, relu) computing

        o[t] = b + sum over j0 <= j < j1 of val[j] * a[col[j] * stride + t],  0 <= t < 16 * vectors

    (then max(., 0) if relu), with o, a, col (int32) and val (fp32) given by addresses. The sums
    stay in `vectors` 16-float registers per set; entries go round-robin to `sets` sets (so
    vectors * sets independent FMA chains hide the FMA latency), summed in a fixed order at the
    end. LLVM IR written directly: from Python source LLVM vectorises the loop over entries
    (gathers) instead of the columns, or keeps the sums in memory."""

    @intrinsic
    def tile(typingctx, o_at, a_at, stride, col_at, val_at, j0, j1, b, relu):  # type: ignore[no-untyped-def]
        sig = types.void(o_at, a_at, stride, col_at, val_at, j0, j1, b, relu)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            o_at, a_at, stride, col_at, val_at, j0, j1, b, relu = args
            f32, i64, i32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
            vt = ir.VectorType(f32, 16)
            vp = vt.as_pointer()
            j0 = builder.sext(j0, i64) if j0.type.width < 64 else j0
            j1 = builder.sext(j1, i64) if j1.type.width < 64 else j1
            o = builder.inttoptr(o_at, f32.as_pointer())
            a = builder.inttoptr(a_at, f32.as_pointer())
            colp = builder.inttoptr(col_at, i32.as_pointer())
            valp = builder.inttoptr(val_at, f32.as_pointer())
            mod = builder.module
            fma = mod.globals.get("llvm.fma.v16f32") or ir.Function(
                mod, ir.FunctionType(vt, [vt, vt, vt]), "llvm.fma.v16f32"
            )
            zero = ir.Constant(vt, [0.0] * 16)
            undef = ir.Constant(vt, ir.Undefined)
            lanes0 = ir.Constant(ir.VectorType(i32, 16), [0] * 16)

            def splat(x):  # type: ignore[no-untyped-def]
                one = builder.insert_element(undef, x, ir.Constant(i32, 0))
                return builder.shuffle_vector(one, undef, lanes0)

            def entry(j, sums):  # type: ignore[no-untyped-def]
                k = builder.sext(builder.load(builder.gep(colp, [j])), i64)
                v = splat(builder.load(builder.gep(valp, [j])))
                row = builder.gep(a, [builder.mul(k, stride)])
                return [
                    builder.call(fma, [v, builder.load(builder.bitcast(
                        builder.gep(row, [ir.Constant(i64, 16 * u)]), vp), align=4), sums[u]])
                    for u in range(vectors)
                ]  # fmt: skip

            fn, start = builder.function, builder.block
            head, body = fn.append_basic_block("tile_head"), fn.append_basic_block("tile_body")
            head1, body1 = fn.append_basic_block("tile_head1"), fn.append_basic_block("tile_body1")
            done = fn.append_basic_block("tile_done")
            builder.branch(head)
            # `sets` entries per pass, entry j + s into set s
            builder.position_at_end(head)
            j = builder.phi(i64)
            j.add_incoming(j0, start)
            sums = [[builder.phi(vt) for _ in range(vectors)] for _ in range(sets)]
            for phi in (p for group in sums for p in group):
                phi.add_incoming(zero, start)
            j_next = builder.add(j, ir.Constant(i64, sets))
            builder.cbranch(builder.icmp_signed("<=", j_next, j1), body, head1)
            builder.position_at_end(body)
            new = [entry(builder.add(j, ir.Constant(i64, s)), sums[s]) for s in range(sets)]
            j.add_incoming(j_next, body)
            for group, values in zip(sums, new, strict=True):
                for phi, value in zip(group, values, strict=True):
                    phi.add_incoming(value, body)
            builder.branch(head)
            # the rest one entry at a time, into set 0
            builder.position_at_end(head1)
            j1_ = builder.phi(i64)
            j1_.add_incoming(j, head)
            first = [builder.phi(vt) for _ in range(vectors)]
            for phi, value in zip(first, sums[0], strict=True):
                phi.add_incoming(value, head)
            builder.cbranch(builder.icmp_signed("<", j1_, j1), body1, done)
            builder.position_at_end(body1)
            new1 = entry(j1_, first)
            j1_.add_incoming(builder.add(j1_, ir.Constant(i64, 1)), body1)
            for phi, value in zip(first, new1, strict=True):
                phi.add_incoming(value, body1)
            builder.branch(head1)
            builder.position_at_end(done)
            bias = splat(b)
            relu_on = builder.icmp_unsigned("!=", relu, ir.Constant(relu.type, 0))
            # "contract" (no fmul to fuse here) marks the adds as flagged, so that Numba's
            # fastmath pass leaves them without "reassoc": the order below is the order.
            exact = ("contract",)
            for u in range(vectors):
                total = first[u]
                for s in range(1, sets):
                    total = builder.fadd(total, sums[s][u], flags=exact)
                total = builder.fadd(bias, total, flags=exact)
                above = builder.fcmp_ordered(">", total, zero, flags=exact)
                positive = builder.select(above, total, zero)
                total = builder.select(relu_on, positive, total)
                at = builder.bitcast(builder.gep(o, [ir.Constant(i64, 16 * u)]), vp)
                builder.store(total, at, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


# The same four sets for every tile width, so that each output is summed in the same order
# whatever the tiles (and so the chunks, and so the thread count).
tile4, tile2, tile1 = make_tile(4, 4), make_tile(2, 4), make_tile(1, 4)


@intrinsic
def t16(typingctx, src_at, src_stride, dst_at, dst_stride):  # type: ignore[no-untyped-def]
    """dst[l * dst_stride + i] = src[i * src_stride + l] for 0 <= i, l < 16: a 16 x 16 fp32
    block transposed in registers (addresses in bytes, strides in floats). Four rounds of
    two-vector shuffles, round b swapping the b x b blocks off the diagonal of each 2b x 2b
    block (AVX-512: 64 vpermt2ps for 256 floats, where element by element takes 256 loads and
    256 stores)."""
    sig = types.void(src_at, src_stride, dst_at, dst_stride)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        src_at, src_stride, dst_at, dst_stride = args
        f32, i32 = ir.FloatType(), ir.IntType(32)
        vt = ir.VectorType(f32, 16)
        src = builder.inttoptr(src_at, f32.as_pointer())
        dst = builder.inttoptr(dst_at, f32.as_pointer())

        def row(base, stride, i):  # type: ignore[no-untyped-def]
            at = builder.gep(base, [builder.mul(stride, ir.Constant(stride.type, i))])
            return builder.bitcast(at, vt.as_pointer())

        r = [builder.load(row(src, src_stride, i), align=4) for i in range(16)]
        for b in (8, 4, 2, 1):
            low = ir.Constant(
                ir.VectorType(i32, 16), [j if not j & b else 16 + j - b for j in range(16)]
            )
            high = ir.Constant(
                ir.VectorType(i32, 16), [j + b if not j & b else 16 + j for j in range(16)]
            )
            for i in range(16):
                if not i & b:
                    r[i], r[i | b] = (
                        builder.shuffle_vector(r[i], r[i | b], low),
                        builder.shuffle_vector(r[i], r[i | b], high),
                    )
        for i in range(16):
            builder.store(r[i], row(dst, dst_stride, i), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def f32_at(typingctx, address):  # type: ignore[no-untyped-def]
    """The integer `address` as a float32 pointer (for numba.carray)."""
    if not isinstance(address, types.Integer):
        return None
    sig = types.CPointer(types.float32)(address)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen
