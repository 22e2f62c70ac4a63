"""Reapply known kernel bugs (mutants) one at a time and check that the named test kills each.

Issue 12 mutation-tested the kernels; these are the bugs the suite once missed, each with the
test written to catch it. Before trusting a kernel rewrite, run

    python3 tools/mutants.py                 # every mutant the machine can run
    python3 tools/mutants.py merge_pad_zero  # one

Each mutant is applied to a copy of the working tree (which is never touched itself; no git
needed, so it runs on a device machine's copy too), then its test runs there under pytest:
the mutant is *killed* when the test fails.
Without a GPU the kernels run in Triton's interpreter; GPU-only mutants are skipped there.
A mutant whose text no longer occurs in the code is reported as stale: move it to the new
code (and keep its test) rather than deleting it. Exit status 1 when a mutant survives or is
stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Mutant:
    name: str
    path: str
    edits: list          # (old, new) text replacements, each old occurring exactly once
    test: str            # pytest node id (a test function: every parametrisation runs, -x)
    why: str
    gpu_only: bool = False


MUTANTS = [
    Mutant("grid_block_swap", "sdm_triton/launch/forward.py",
           [("    n_qp = _cdiv(n, t.block_m) * k\n    n_gp = k * _cdiv(m, t.block_m)\n    s_q, s_g, seg_q, seg_g",
             "    n_qp = _cdiv(n, t.block_n) * k\n    n_gp = k * _cdiv(m, t.block_m)\n    s_q, s_g, seg_q, seg_g")],
           "tests/test_kernels.py::test_kernels_match_float64_no_worse_than_pytorch",
           "block_m / block_n swapped in the statistics grid: only non-square tiles show it"),
    Mutant("neg_rescale_dropped", "sdm_triton/kernels/stats.py",
           [("neg = alpha * neg + tl.sum", "neg = neg + tl.sum")],
           "tests/test_kernels.py::test_statistics_match_the_torch_backend",
           "the running negatives' mass loses its online-softmax rescale"),
    Mutant("neg_as_one_minus_pos", "sdm_triton/kernels/finish.py",
           [("        p_neg = neg / safe_l\n", "        p_neg = 1.0 - (1.0 - neg / safe_l)\n")],
           "tests/test_kernels.py::test_reverse_kl_gradients_at_well_separated_fits",
           "reverse KL's negatives' mass as 1 - P+ (what finish did): nothing of it left at good fits"),
    Mutant("merge_pad_zero", "sdm_triton/kernels/finish.py",
           [('m = tl.full((BLOCK,), -float("inf"), dtype=tl.float32)', "m = tl.zeros((BLOCK,), dtype=tl.float32)")],
           "tests/test_kernels.py::test_anti_aligned_features_at_a_large_scale",
           "the segment merge starts its maximum at 0: wrong where every logit is far below 0"),
    Mutant("lse_folded", "sdm_triton/kernels/grad.py",
           [("z_r = tl.where(on_r, t - m_r[:, None], 0.0)", "z_r = tl.where(on_r, t - (m_r + ll_r * LOG2E)[:, None], 0.0)"),
            ("z_c = tl.where(on_c, t - m_c[None, :], 0.0)", "z_c = tl.where(on_c, t - (m_c + ll_c * LOG2E)[None, :], 0.0)"),
            ("p_r = tl.exp2(z_r) * il_r[:, None]", "p_r = tl.exp2(z_r)"),
            ("p_c = tl.exp2(z_c) * il_c[None, :]", "p_c = tl.exp2(z_c)"),
            ("d_r = p_r * ((LN2 * z_r - ll_r[:, None])", "d_r = p_r * ((LN2 * z_r)"),
            ("d_c = p_c * ((LN2 * z_c - ll_c[None, :])", "d_c = p_c * ((LN2 * z_c)")],
           "tests/test_kernels.py::test_exact_logits_give_gradients_to_fp32_accuracy",
           "the backward's log P from one fp32 log-sum-exp m + log2 l (rounded at |m| ~ 4000)"),
    Mutant("centre_overflow", "sdm_triton/kernels/grad.py",
           [("a = tl.where(m_r <= NEG_BIG, 0.0, m_r * inv_s_log2e)", "a = m_r * inv_s_log2e")],
           "tests/test_hygiene.py::test_absent_samples_at_any_logit_scale",
           "dL/ds centred on NEG_BIG / (s log2e) = -inf for a row with no present entry (s < 0.7)"),
    Mutant("int32_offsets", "sdm_triton/launch/tiles.py",
           [("return triton.language.int64 if max(extents) >= 2**31 else triton.language.int32",
             "return triton.language.int32")],
           "tests/test_kernels.py -k 64bit_offsets",
           "32-bit offsets past 2^31 elements (dense labels N M, features N D)", gpu_only=True),
    # issue 23: one-line bugs the suite let through at 10eec40
    Mutant("lo_sign", "sdm_triton/kernels/tiles.py",
           [("return hi32.to(HALF), (w - hi32).to(HALF)", "return hi32.to(HALF), (hi32 - w).to(HALF)")],
           "tests/test_kernels.py::test_half_gradients_of_near_perfect_fits",
           "W's lo half with the wrong sign (fp16 everywhere, bf16 on the GPU)"),
    Mutant("lo_sign_interpreted", "sdm_triton/kernels/tiles.py",
           [("return hi32, round_bf16(w - hi32)", "return hi32, round_bf16(hi32 - w)")],
           "tests/test_kernels.py::test_half_gradients_of_near_perfect_fits",
           "the interpreter's bf16 lo half with the wrong sign"),
    Mutant("gmax_signed", "sdm_triton/launch/backward.py",
           [("top = w.abs().amax()", "top = w.amax()")],
           "tests/test_kernels.py::test_fp16_gradients_with_negative_weights",
           "the chunked fp16 workspace scaled by max w, not max |w| (all weights negative: W overflows)"),
    Mutant("gmax_signed_fused", "sdm_triton/kernels/grad.py",
           [("mask=i < N)\n        top = tl.maximum(top, tl.abs(w))", "mask=i < N)\n        top = tl.maximum(top, w)"),
            ("mask=j < M)\n        top = tl.maximum(top, tl.abs(w))", "mask=j < M)\n        top = tl.maximum(top, w)")],
           "tests/test_kernels.py::test_fp16_gradients_with_negative_weights",
           "the fused fp16 scale from max w, not max |w|"),
    Mutant("fp16_w_bound_normalised", "sdm_triton/launch/backward.py",
           [("top = top * _scale_product_bound(p, buf)", "top = top")],
           "tests/test_edge_values.py::test_fp16_unnormalised_features_give_the_right_gradients",
           "the chunked fp16 W's scale assumes normalised rows (p_i p_j < 4): unnormalised, W overflows "
           "(fp16 inputs' hi + lo and KernelConfig.w_dtype='fp16' alike)"),
    Mutant("fp16_w_bound_normalised_fused", "sdm_triton/kernels/grad.py",
           [("gmax = gmax * scale_product_bound(pre_ptr, NR, N, BLOCK_W)", "gmax = gmax")],
           "tests/test_edge_values.py::test_fp16_unnormalised_features_give_the_right_gradients",
           "the fused fp16 W's scale assumes normalised rows"),
    Mutant("dscale_stale", "sdm_triton/launch/backward.py",
           [("d_scale += dsp[:tiles_n].sum()", "d_scale += dsp.sum()")],
           "tests/test_kernels.py::test_learnable_scale_over_chunks_of_unequal_width",
           "dL/ds summed over stale tile rows of an earlier, wider chunk"),
    Mutant("no_q_programs", "sdm_triton/launch/backward.py",
           [("n_qp = q_programs if (want_q or want_scale) else 0", "n_qp = q_programs if want_q else 0")],
           "tests/test_kernels.py::test_learnable_scale_with_frozen_features",
           "no q programs in the fused backward when q needs no gradient: dL/ds = 0"),
    # (fused_block_k, the fused backward rebuilding S with its own BLOCK_K, was retired on
    # 2026-12-07: since the fp32 dot sums fixed steps whatever BLOCK_K (tiles._dot_tile_fp32) and the
    # tensor cores chain a half dot's k steps alike however they are grouped, it changes no bit on a
    # GPU; it survived every test there and under the interpreter: bench/NOTES.md 38)
    # issue 18
    Mutant("logits_contracted", "sdm_triton/kernels/tiles.py",
           [("    return libdevice.mul_rn(x, y)", "    return x * y")],
           "tests/test_kernels.py::test_exact_logits_give_gradients_to_fp32_accuracy",
           "t = cos * s log2e left to the compiler, which fuses it into the backward's t - m", gpu_only=True),
    Mutant("interpreter_matmul", "sdm_triton/kernels/tiles.py",
           [("    if INTERPRETED:\n        return acc + tl.sum(", "    if False:\n        return acc + tl.sum(")],
           "tests/test_edge_values.py::test_huge_logits_give_the_right_gradients",
           "the interpreter's logit tiles by numpy's matmul, which rounds a product differently with the "
           "operands swapped: the backward's t is a rounding off the forward's maxima, inf / wrong at huge "
           "logits (issue 26.4)"),
    Mutant("ranks_merge_neighbours", "sdm_triton/kernels/centroids.py",
           [("right = (v <= value) if STRICT else (v < value)",
             "right = (v <= value) if STRICT else (v < value - 1)")],
           "tests/test_positives.py::test_centroids_match_float64",
           "ids one apart share a number: the centroids path's rank compare (reverse KL's negatives' mass) "
           "and its groups (counts, centroids) take neighbours' samples for positives"),
    Mutant("centroids_take_absent_rows", "sdm_triton/kernels/centroids.py",
           [("    keep = present(msk, k * s_msk_gal, s_msk, rows, row_in)\n    r = ",
             "    keep = row_in\n    r = ")],
           "tests/test_positives.py::test_centroids_match_float64",
           "the identity centroids sum absent samples' features too: forward KL's positives' logit sums off"),
    Mutant("positives_count_absent_columns", "sdm_triton/kernels/centroids.py",
           [("    if before_ptr is not None:\n        before = ", "    if False:\n        before = ")],
           "tests/test_positives.py::test_centroids_match_float64",
           "a row's positives counted over every column of its id, absent ones included: forward KL's "
           "mean over the positives and the rows without a present positive off"),
    Mutant("ids_kept_narrow", "sdm_triton/kernels/tiles.py",
           [("    if ids_ptr.dtype.element_ty != tl.int32:\n        ids = ids.to(tl.int64)",
             "    if ids_ptr.dtype.element_ty == tl.int64:\n        ids = ids.to(tl.int64)")],
           "tests/test_edge_values.py::test_ids_of_two_dtypes_compare_by_value",
           "ids other than int32 and int64 compared as loaded: Triton promotes int8 vs uint8 to uint8 (-1 == 255) "
           "on a GPU (the interpreter compares numpy's way, by value)", gpu_only=True),
    Mutant("fp64_scalars", "sdm_triton/kernels/tiles.py",
           [("        return x\n    return tl.cast(x, tl.float32)", "        return x\n    return x")],
           "tests/test_compile_check.py::test_kernels_compile_with_inductor_scalar_types",
           "float arguments used as launched: fp64 under torch.compile (a loop-carried fp32 turns fp64)"),
    # issue 26 section 5: survivors of a second round of one-line mutants (kernels, launch layer,
    # host reduction)
    Mutant("multi_seg_gallery", "sdm_triton/kernels/stats.py",
           [("k = ((pid // segs) % K).to(tl.int64)", "k = (pid % K).to(tl.int64)")],
           "tests/test_galleries.py::test_triton_matches_float64_no_worse_than_pytorch",
           "the statistics' gallery index of a q-row program decoded without its column segment (K > 1 "
           "galleries in several segments, K sharing a factor with their count: unwritten partials, NaN)"),
    Mutant("chunked_operand_stride_d", "sdm_triton/kernels/grad.py",
           [("offs_d[None, :] * sx_d,\n                    mask=keep[:, None] & d_in[None, :], other=0.0)",
             "offs_d[None, :],\n                    mask=keep[:, None] & d_in[None, :], other=0.0)")],
           "tests/test_hygiene.py::test_strided_arguments_give_the_numbers_of_the_contiguous_copy",
           "the chunked backward's operand kernel reads features with a unit feature stride "
           "(x.T.contiguous().T features)"),
    Mutant("chunked_q_mask_stride", "sdm_triton/launch/backward.py",
           [('p.q_mask, (0, _side_args(p)["s_qmsk"])', "p.q_mask, (0, 1)")],
           "tests/test_hygiene.py::test_strided_arguments_give_the_numbers_of_the_contiguous_copy",
           "the chunked backward's q side reads q_mask with stride 1 (a column of a presence table)"),
    Mutant("chunked_radial_guard", "sdm_triton/kernels/grad.py",
           [("radial = tl.where(norm > NORM_EPS, radial * r * r, 0.0)", "radial = radial * r * r")],
           "tests/test_edge_values.py::test_norms_below_norm_eps",
           "the chunked input gradient projects the radial part off a row of norm below NORM_EPS "
           "(F.normalize's backward there is d / NORM_EPS)"),
    Mutant("pos_g2q_count", "sdm_triton/reduction.py",
           [("red[RED.pos_g2q] / n_g.clamp_min(1)", "red[RED.pos_g2q] / n_q.clamp_min(1)")],
           "tests/test_kernels.py::test_statistics_match_the_torch_backend",
           "pos_prob_g2q averaged over the q2g valid count (both backends alike: N != M shows it)"),
    Mutant("label_terms_scaled", "sdm_triton/kernels/finish.py",
           [("ln_l + (ylny / safe_y - ln_unscaled(safe_y))", "ln_l + (ylny / safe_y - ln_precise(safe_y)) + 16.635532333438686")],
           "tests/test_edge_values.py::test_dense_label_terms_are_as_accurate_as_the_reference",
           "forward KL's dense label terms with the scaled labels' ln ysum and ln 2^24 added back: the "
           "fp32 cancellation of 16.6 that the GPU suite found (issue 26; its torch-backend twin too)"),
    Mutant("fp16_w_no_headroom", "sdm_triton/launch/backward.py",
           [("    return 2.0 ** math.floor(math.log2(2.0**11 / bound))", "    return 1.0")],
           "tests/test_edge_values.py::test_fp16_w_keeps_its_accuracy_below_the_normal_range",
           "fp16 W divided by the largest weight only: below fp16's normal range it keeps an absolute "
           "accuracy, one dg row 6.5% off (issue 26)"),
    # issue 27: KernelConfig.w_dtype="fp16"
    Mutant("fp16_w_unrounded", "sdm_triton/kernels/grad.py",
           [("        acc = tl.dot(W.to(tl.float16), b_op, acc)",
             '        acc = tl.dot(W, b_op.to(tl.float32), acc, input_precision="ieee")')],
           "tests/test_kernels.py::test_fp16_w_is_one_rounding_of_w",
           "the fused backward's fp16 W mode multiplies fp32 W (no rounding of W): it errs as hi + lo does, "
           "and the option would measure nothing"),
    Mutant("w_dtype_ignored", "sdm_triton/launch/policy.py",
           [('    return "fp16" if p.config.w_dtype == "fp16" else "split"',
             '    return "split"')],
           "tests/test_kernels.py::test_w_dtype_changes_only_the_half_inputs_backward",
           "KernelConfig.w_dtype parsed but never reaching the kernels: fp16 W runs as hi + lo"),
    # issue 28: the torch backend's plain problems
    Mutant("plain_lane_keeps_invalid_rows", "sdm_triton/torch_backend.py",
           [("        if large or tiny or some_invalid:\n            return None", "        if large or tiny:\n            return None")],
           "tests/test_torch_paths.py::test_the_plain_lane_is_the_dense_path",
           "the plain lane keeps a problem with an invalid row (no positive): its loss and counts take the row in"),
    # issue 28: the forward in one launch (kernels/single.py)
    Mutant("single_ticket_kept", "sdm_triton/kernels/single.py",
           [("        tl.atomic_xchg(count_ptr, 0)\n", "")],
           "tests/test_single_forward.py::test_the_single_forward_leaves_the_ticket_at_zero_call_after_call",
           "the last program leaves the ticket counter where it is: the next launch's last program never "
           "sees the last ticket, and its value and reduction are never written"),
    Mutant("single_slots_by_block", "sdm_triton/kernels/single.py",
           [("_slot_sums(sums_ptr, k, K, 0, q_blocks, BLOCK)", "_slot_sums(sums_ptr, k * q_blocks, 1, 0, q_blocks, BLOCK)")],
           "tests/test_single_forward.py::test_the_single_forward_of_several_galleries_and_options",
           "the q programs' slots read gallery-major (program b * K + k is block-major): wrong with K > 1"),
    Mutant("single_own_columns_only", "sdm_triton/kernels/single.py",
           [("    g_last = tl.where(is_q, g_blocks, block + 1)", "    g_last = tl.where(is_q, 1, block + 1)")],
           "tests/test_single_forward.py::test_the_single_forward_is_the_staged_one",
           "a q program normalises only the first block of gallery rows and reads the other columns' "
           "norms before anyone stored them (the interpreter runs the q programs first; the converse, "
           "gallery programs reading q rows' norms the q programs stored, only a GPU can show)"),
]


def _apply(tree: str, mutant: Mutant) -> bool:
    """Apply the edits in ``tree``; False when some old text is not there exactly once (stale)."""
    path = os.path.join(tree, mutant.path)
    with open(path) as f:
        src = f.read()
    for old, new in mutant.edits:
        if src.count(old) != 1:
            return False
        src = src.replace(old, new)
    with open(path, "w") as f:
        f.write(src)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    known = [m.name for m in MUTANTS]
    ap.add_argument("names", nargs="*", metavar="name", help="mutants to run (default: all): " + ", ".join(known))
    args = ap.parse_args()
    unknown = sorted(set(args.names) - set(known))
    if unknown:     # (argparse's choices reject an empty nargs="*" list on Python < 3.12)
        ap.error(f"unknown mutant(s) {', '.join(unknown)}; known: {', '.join(known)}")
    import torch
    gpu = torch.cuda.is_available()

    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="sdm-mutants-") as tmp:
        tree = os.path.join(tmp, "tree")
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
            ".git", "__pycache__", ".hypothesis", ".pytest_cache", ".whl", ".gpu", "results", "*.png"))
        # the installed package maps sdm_triton.reference to the top-level reference/ (pyproject)
        link = os.path.join(tree, "sdm_triton", "reference")
        if not os.path.lexists(link):      # (a checkout may carry the link already: copied as a link)
            os.symlink(os.path.join("..", "reference"), link)
        env = dict(os.environ, PYTHONPATH=tree)
        if not gpu:
            env["TRITON_INTERPRET"] = "1"
        for m in chosen:
            if m.gpu_only and not gpu:
                print(f"{m.name:20s} skipped (needs a GPU)   {m.test}")
                continue
            if not _apply(tree, m):
                print(f"{m.name:20s} STALE: its text is no longer in {m.path}")
                failures += 1
                continue
            node, *extra = m.test.split(" ")
            t0 = time.time()
            try:
                r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", node,
                                    *extra], cwd=tree, env=env, capture_output=True, text=True)
            finally:
                shutil.copy2(os.path.join(ROOT, m.path), os.path.join(tree, m.path))     # undo the mutant
            failed = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED")]
            if r.returncode == 1 and failed:
                print(f"{m.name:20s} killed  ({time.time() - t0:4.0f} s) by {failed[0][7:].split(' - ')[0]}", flush=True)
            else:
                failures += 1
                last = r.stdout.strip().splitlines()[-1:] or r.stderr.strip().splitlines()[-1:]
                print(f"{m.name:20s} SURVIVED (pytest exit {r.returncode}: {last[0] if last else ''})  {m.test}",
                      flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
