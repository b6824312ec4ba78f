"""The lean forward against the transformers model it is built from: prefill, decode,
rollback, tree masks with per-node positions, padded batches, chosen hidden layers."""
from __future__ import annotations

import json

import pytest
import torch

from scylla import ScyllaError
from scylla.decoding import DraftTree, generate_ids
from scylla.lean import HFForward, LeanLM, make_forward
from tests.conftest import tiny_llama

FEATURES = (0, 2, 3, 4)   # embeddings, two inner layers, the last layer after the final norm


def pair(dtype=torch.float32, **kwargs):
    model = tiny_llama(**kwargs).to(dtype)
    return LeanLM(model), HFForward(model)


def close(a, b, dtype):
    # transformers computes RMSNorm and RoPE in float32 even for a float64 model
    tol = 1e-5 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


def both(lean, hf, ids, caches, **kwargs):
    out_l = lean.forward(ids, caches[0], **kwargs)
    out_h = hf.forward(ids, caches[1], **kwargs)
    return out_l, out_h


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prefill_decode_and_rollback_match_transformers(dtype):
    lean, hf = pair(dtype)
    caches = (lean.new_cache(1, 64), hf.new_cache(1, 64))
    prompt = torch.tensor([[5, 9, 33, 12, 40, 7, 7, 21]])
    (ll, fl), (lh, fh) = both(lean, hf, prompt, caches, features=FEATURES)
    close(ll, lh, dtype)
    close(fl, fh, dtype)
    for c in caches:
        c.keep(0, list(range(8)))
    (ll, _), (lh, _) = both(lean, hf, torch.tensor([[3, 4, 5]]), caches)   # a 3-token verify block
    close(ll, lh, dtype)
    for c in caches:
        c.keep(0, [0])                                                        # keep one, roll back two
    (ll, _), (lh, _) = both(lean, hf, torch.tensor([[11]]), caches)
    close(ll, lh, dtype)
    fresh = lean.new_cache(1, 64)
    ref, _ = lean.forward(torch.tensor([[5, 9, 33, 12, 40, 7, 7, 21, 3, 11]]), fresh)
    close(ll[0, -1], ref[0, -1], dtype)   # rollback left exactly the prefix's cache


def test_tree_mask_and_positions_match_transformers_and_each_path():
    lean, hf = pair(torch.float64)
    caches = (lean.new_cache(1, 64), hf.new_cache(1, 64))
    prompt = torch.tensor([[5, 9, 33, 12, 40]])
    both(lean, hf, prompt, caches)
    for c in caches:
        c.keep(0, list(range(5)))
    tree = DraftTree([10, 11, 12, 13, 14], [-1, -1, 0, 2, 1])
    ids = torch.tensor([[7] + tree.tokens])
    offsets = torch.tensor([[0] + tree.depths])
    (ll, fl), (lh, fh) = both(lean, hf, ids, caches, offsets=offsets, block=tree.block_mask()[None], features=(4,))
    close(ll, lh, torch.float64)
    close(fl, fh, torch.float64)
    # each node's logits equal those of its root-to-node path run as a plain chain
    for node in range(len(tree)):
        path = list(reversed(tree.lineage(node)))
        chain = lean.new_cache(1, 64)
        full, _ = lean.forward(torch.tensor([[5, 9, 33, 12, 40, 7] + [tree.tokens[i] for i in path]]), chain)
        close(ll[0, node + 1], full[0, -1], torch.float64)


def test_padded_ragged_batch_rows_equal_their_single_rows():
    lean, hf = pair(torch.float64)
    prompts = [[5, 9, 33, 12, 40, 7], [8, 8, 3], [17, 2, 90, 4, 4]]
    batch = lean.new_cache(3, 64)
    ids = torch.zeros(3, 6, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    logits, feats = lean.forward(ids, batch, features=(2,), logits_at=torch.tensor([[5], [2], [4]]))
    for b, p in enumerate(prompts):
        batch.keep(b, list(range(len(p))))
    step, _ = lean.forward(torch.tensor([[1, 2], [3, 4], [5, 6]]), batch)
    for b, p in enumerate(prompts):
        for fwd in (lean, hf):
            single = fwd.new_cache(1, 64)
            one, one_feats = fwd.forward(torch.tensor([p]), single, features=(2,))
            close(logits[b, 0], one[0, -1], torch.float64)
            close(feats[b, :len(p)], one_feats[0], torch.float64)
            single.keep(0, list(range(len(p))))
            nxt, _ = fwd.forward(torch.tensor([[2 * b + 1, 2 * b + 2]]), single)
            close(step[b], nxt[0], torch.float64)


def test_hf_backend_decodes_what_the_lean_backend_decodes(tiny):
    from scylla.models import Target

    model = tiny.model
    hf_target = Target(model, None, "tiny", "none", "cpu", backend="hf")
    prompt = [5, 9, 33, 12, 40, 7, 7, 21]
    for kwargs in ({"k": 3}, {"tree": "tree:3,2,6"}):
        lean_ids, _ = generate_ids(tiny, None, prompt, max_new_tokens=20, **kwargs)
        hf_ids, _ = generate_ids(hf_target, None, prompt, max_new_tokens=20, **kwargs)
        assert lean_ids == hf_ids


def test_unsupported_models_and_backends_are_refused():
    model = tiny_llama()
    model.config.model_type = "gpt2"
    with pytest.raises(ScyllaError, match="Llama-shaped"):
        LeanLM(model)
    with pytest.raises(ScyllaError, match="--backend"):
        make_forward(tiny_llama(), "fast")


def test_int8_path_is_a_close_but_different_target():
    model = tiny_llama().float()
    fp32, int8 = LeanLM(model), LeanLM(model, quant="int8")
    prompt = torch.tensor([[5, 9, 33, 12, 40, 7, 7, 21]])
    a, _ = fp32.forward(prompt, fp32.new_cache(1, 32))
    b, _ = int8.forward(prompt, int8.new_cache(1, 32))
    err = (a - b).abs().max().item()
    assert 0 < err < 0.1 * a.abs().max().item()   # quantized: not equal, but near


def test_bf16_draft_linears_are_near_fp32_and_chosen_only_with_native_bf16(monkeypatch):
    import scylla.kernels as lean

    if not lean.can_prepack("cpu"):   # a torch build without oneDNN: drafts keep plain fp32
        monkeypatch.setattr(lean, "cpu_has_bf16", lambda: True)
        assert lean.draft_linear_kind("cpu") == "fp32"
        return
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(300, 64, generator=gen), torch.randn(3, 64, generator=gen)
    want, got = torch.nn.functional.linear(x, weight), lean.Linear(weight, "bf16")(x)
    assert got.dtype == torch.float32 and 0 < (got - want).abs().max() < 0.02 * want.abs().max()
    monkeypatch.setattr(lean, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(lean, "DRAFT_INT4", False)       # SCYLLA_DRAFT_INT4=0
    assert lean.draft_linear_kind("cpu") == "bf16"
    assert lean.draft_linear_kind("cpu", torch.float16) != "bf16"
    monkeypatch.setattr(lean, "DRAFT_INT4", True)
    assert lean.draft_linear_kind("cpu") == ("int4" if lean.int4_available() else "bf16")
    monkeypatch.setattr(lean, "DRAFT_INT4", False)
    monkeypatch.setattr(lean, "DRAFT_BF16", False)       # SCYLLA_DRAFT_BF16=0
    assert lean.draft_linear_kind("cpu") == "packed"
    monkeypatch.setattr(lean, "DRAFT_BF16", True)
    monkeypatch.setattr(lean, "cpu_has_bf16", lambda: False)
    assert lean.draft_linear_kind("cpu") == "packed"


def test_int4_draft_linears_are_near_fp32():
    import scylla.kernels as kernels

    if not kernels.int4_available():
        pytest.skip("no native bf16: drafts stay bf16 or fp32")
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(300, 64, generator=gen) * 0.05, torch.randn(3, 64, generator=gen)
    want, got = torch.nn.functional.linear(x, weight), kernels.Linear(weight, "int4")(x)
    assert got.dtype == torch.float32 and 0 < (got - want).abs().max() < 0.1 * want.abs().max()


# ---------------------------------------------------------------- the real bundled target

@pytest.mark.real
def test_real_target_lean_logits_and_features_match_transformers(real_target):
    lean, hf = LeanLM(real_target.model), HFForward(real_target.model)
    from scylla.models import encode_prompt

    ids = torch.tensor([encode_prompt(real_target, "Explain what a hash map is in two sentences.")])
    layers = (2, 15, 27, 30)
    ll, fl = lean.forward(ids, lean.new_cache(1, 256), features=layers)
    lh, fh = hf.forward(ids, hf.new_cache(1, 256), features=layers)
    assert (ll - lh).abs().max() < 2e-2 * lh.abs().max()
    assert (fl - fh).abs().max() < 2e-2 * fh.abs().max()
    assert (ll.argmax(-1) == lh.argmax(-1)).float().mean() > 0.97


@pytest.mark.real
def test_real_target_lean_greedy_equals_generate_on_evaluation_prompts(real_target):
    from scylla.models import encode_prompt

    rows = [json.loads(line) for line in open("assets/eval_prompts.jsonl")]
    chosen = [r for i, r in enumerate(rows) if i % 12 == 0]   # one per category pair, 4 prompts
    same = 0
    for row in chosen:
        ids = encode_prompt(real_target, row["turns"][0])
        want = real_target.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=24,
                                          do_sample=False)[0, len(ids):].tolist()
        got, _ = generate_ids(real_target, None, ids, max_new_tokens=24)
        same += got == want[:len(got)] and len(got) == len(want)
    assert same >= len(chosen) - 1   # at most one float near-tie in four
