"""The q4 target: the GGUF's own blocks read exactly, run by the int4 kernel within what
bf16 rounding allows, and speculative decoding on it lossless against its own plain decoding."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from scylla import ScyllaError
from scylla.decoding import batch_generate_ids, generate_ids
from scylla.drafts import LayerSkipDraft, NgramDraft
from scylla.kernels import BlockEmbedding, Int4Linear, int4_available
from scylla.lean import LeanLM
from scylla.models import Target
from scylla.q4 import blocks_of, load_gguf_weights, read_tensors, unpermute_rows
from tests.conftest import tiny_llama
from tests.test_engine import one_thread  # noqa: F401
from tests.test_lossless import SampledTreeDraft, chisquare_p
from tests.test_tree import RandomTreeDraft

pytestmark = pytest.mark.skipif(not int4_available(), reason="no native bf16: the q4 target falls back to fp32")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to query and key rows (the loader must undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path, linear_type="Q4_1", embed_type="Q8_0", head_type="Q4_1"):
    """A GGUF of a transformers Llama with llama.cpp's tensor names and row order."""
    import gguf

    cfg = model.config
    qt = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), "llama")

    def put(name, weight, kind):
        arr = weight.detach().float().numpy()
        if kind == "F32":
            writer.add_tensor(name, arr.astype(np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(arr, qt[kind]), raw_dtype=qt[kind])

    put("token_embd.weight", model.model.embed_tokens.weight, embed_type)
    put("output.weight", model.lm_head.weight, head_type)
    put("output_norm.weight", model.model.norm.weight, "F32")
    for i, layer in enumerate(model.model.layers):
        a, m, p = layer.self_attn, layer.mlp, f"blk.{i}."
        put(p + "attn_q.weight", torch.from_numpy(llama_cpp_permute(a.q_proj.weight.detach().numpy(),
                                                                     cfg.num_attention_heads)), linear_type)
        put(p + "attn_k.weight", torch.from_numpy(llama_cpp_permute(a.k_proj.weight.detach().numpy(),
                                                                     cfg.num_key_value_heads)), linear_type)
        for name, w in (("attn_v", a.v_proj), ("attn_output", a.o_proj), ("ffn_gate", m.gate_proj),
                        ("ffn_up", m.up_proj), ("ffn_down", m.down_proj)):
            put(p + name + ".weight", w.weight, linear_type)
        put(p + "attn_norm.weight", layer.input_layernorm.weight, "F32")
        put(p + "ffn_norm.weight", layer.post_attention_layernorm.weight, "F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_q4_target(tmp_path, **kwargs) -> Target:
    model = tiny_llama(**{"hidden": 32, **kwargs}).float()
    path = write_llama_gguf(model, tmp_path / "tiny.gguf")
    return Target(model, tokenizer=None, name="tiny-q4", quant="q4", device="cpu", gguf_path=path)


def test_blocks_read_from_a_written_gguf_equal_the_gguf_library_dequantization(tmp_path):
    import gguf

    model = tiny_llama(hidden=64).float()
    path = write_llama_gguf(model, tmp_path / "t.gguf")
    tensors = read_tensors(path)
    for name in ("blk.0.ffn_down.weight", "token_embd.weight", "output.weight", "blk.1.attn_q.weight"):
        kind, rows, cols, raw = tensors[name]
        want = gguf.quants.dequantize(np.asarray(raw), gguf.GGMLQuantizationType[kind])
        got = blocks_of(tensors[name], name).dequantize().numpy()
        assert got.shape == (rows, cols) and np.array_equal(got, want), name


def test_query_and_key_rows_come_back_in_transformers_order(tmp_path):
    model = tiny_llama(hidden=64).float()
    weights = load_gguf_weights(write_llama_gguf(model, tmp_path / "t.gguf"), 4, 4, 2)
    for i, layer in enumerate(model.model.layers):
        for name, proj in (("q", layer.self_attn.q_proj), ("k", layer.self_attn.k_proj)):
            err = (weights.layers[i][name].dequantize() - proj.weight).abs().max()
            assert err < 0.2 * proj.weight.abs().max(), (i, name)   # 4-bit rounding, but not shuffled
    perm = unpermute_rows(16, 2)
    assert sorted(perm.tolist()) == list(range(16)) and perm.tolist() != list(range(16))


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [96, 40])   # 40: not a multiple of the kernel's 16-row packing
def test_int4_linear_equals_dequantize_then_fp32_within_bf16_rounding(kind, rows):
    import gguf

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, 128, generator=gen) * 0.05
    raw = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[kind])
    blocks = blocks_of((kind, rows, 128, raw), "w")
    x = torch.randn(5, 128, generator=gen)
    want = x @ blocks.dequantize().T
    got = Int4Linear(blocks)(x)
    assert got.dtype == torch.bfloat16   # really the bf16 path, not a silent fp32 one
    got = got.float()
    # bf16 keeps 8 significant bits: activations and scales each round by <= 2^-9 relative,
    # summed over 128 products of random sign
    tol = 4 * 2 ** -9 * (x.abs() @ blocks.dequantize().abs().T)
    assert got.shape == want.shape and bool(((got - want).abs() <= tol + 1e-3).all())
    assert not torch.equal(got, want)   # really the bf16 path, not a silent fp32 one


def test_block_embedding_is_exact():
    import gguf

    weight = torch.randn(50, 64) * 0.1
    for kind in ("Q8_0", "Q4_1"):
        raw = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[kind])
        blocks = blocks_of((kind, 50, 64, raw), "e")
        ids = torch.tensor([[3, 49, 0]])
        assert torch.equal(BlockEmbedding(blocks)[ids], blocks.dequantize()[ids])


def test_a_gguf_of_another_quant_type_is_refused_on_one_line(tmp_path):
    model = tiny_llama(hidden=32).float()
    path = write_llama_gguf(model, tmp_path / "q5.gguf", linear_type="Q5_0")
    with pytest.raises(ScyllaError) as err:
        load_gguf_weights(path, 4, 4, 2)
    assert "Q5_0" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ScyllaError, match="not a readable GGUF"):
        load_gguf_weights(tmp_path / "bad.gguf", 4, 4, 2)


def test_q4_forward_is_near_the_fp32_forward_of_the_same_blocks(tmp_path):
    target = tiny_q4_target(tmp_path)
    q4 = target.forward
    assert q4.kind == "int4" and "int4" in target.kernels
    # the fp32 reference of the very same blocks: the model's weights replaced by them
    weights = load_gguf_weights(target.gguf_path, 4, 4, 2)
    ref_model = tiny_llama(hidden=32).float()
    for layer, b in zip(ref_model.model.layers, weights.layers):
        for name, proj in (("q", layer.self_attn.q_proj), ("k", layer.self_attn.k_proj),
                           ("v", layer.self_attn.v_proj), ("o", layer.self_attn.o_proj),
                           ("gate", layer.mlp.gate_proj), ("up", layer.mlp.up_proj), ("down", layer.mlp.down_proj)):
            proj.weight.data = b[name].dequantize()
    ref_model.model.embed_tokens.weight.data = weights.embed.dequantize()
    ref_model.lm_head.weight.data = weights.head.dequantize()
    ref = LeanLM(ref_model)
    ids = torch.tensor([[5, 9, 33, 12, 40, 7, 7, 21]])
    a, _ = q4.forward(ids, q4.new_cache(1, 32))
    b, _ = ref.forward(ids, ref.new_cache(1, 32))
    assert 0 < (a - b).abs().max() < 0.03 * b.abs().max()


def q4_plain(target, prompt, n):
    return generate_ids(target, None, prompt, max_new_tokens=n)[0]


@pytest.mark.parametrize("kind,shape", [("ngram", None), ("layerskip", None), ("random-tree", "tree:4,3,12"),
                                        ("ngram", "tree:3,2,6")])
def test_speculative_greedy_on_q4_equals_q4_plain_decoding(kind, shape, tmp_path):
    target = tiny_q4_target(tmp_path)
    draft = {"ngram": NgramDraft(), "layerskip": LayerSkipDraft(target, 2),
             "random-tree": RandomTreeDraft(96, seed=1)}[kind]
    rng, accepted = random.Random(7), 0
    for _ in range(3):
        prompt = [rng.randrange(3, 12) for _ in range(rng.randrange(4, 30))]
        got, steps = generate_ids(target, draft, prompt, max_new_tokens=30, k=4, tree=shape)
        assert got == q4_plain(target, prompt, 30)
        accepted += sum(s.accepted for s in steps)
    assert accepted > 0 or kind != "layerskip"   # the verify path really kept drafted tokens


def test_compiled_q4_steps_match_blocks_bitwise_and_speculation_stays_lossless(tmp_path, monkeypatch):
    from scylla.lean import cxx_available

    if not cxx_available():   # CI installs g++ (scripts/test.sh), so there a missing one is a failure
        if os.environ.get("SCYLLA_STRICT"):
            pytest.fail("no C++ compiler for the compiled q4 stack (apt-get install -y g++)")
        pytest.skip("no C++ compiler: the q4 stack runs eagerly here")
    monkeypatch.setenv("SCYLLA_COMPILE", "1")
    target = tiny_q4_target(tmp_path)
    fwd = target.forward
    assert fwd.stack.compiled_layers is not None and "compiled" in target.kernels
    prompt, ids = torch.tensor([[5, 9, 33, 12, 40]]), torch.tensor([[7, 21, 3, 60]])
    cache = fwd.new_cache(1, 32)
    fwd.forward(prompt, cache)
    cache.keep(0, list(range(5)))
    block, _ = fwd.forward(ids, cache)
    one_by_one = []
    for j in range(4):
        logits, _ = fwd.forward(ids[:, j:j + 1], cache)
        cache.keep(0, [0])
        one_by_one.append(logits)
    assert torch.equal(block, torch.cat(one_by_one, 1))   # the same numbers, whichever width
    rng = random.Random(3)
    for draft, shape in ((RandomTreeDraft(96, seed=1), "tree:4,3,12"), (NgramDraft(), None)):
        prompt = [rng.randrange(3, 12) for _ in range(rng.randrange(4, 30))]
        got, _ = generate_ids(target, draft, prompt, max_new_tokens=30, k=4, tree=shape)
        assert got == q4_plain(target, prompt, 30)


def test_a_q4_batch_of_rows_equals_each_rows_plain_decoding(tmp_path):
    target = tiny_q4_target(tmp_path)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 12) for _ in range(n)] for n in (5, 17, 9)]
    got, _ = batch_generate_ids(target, LayerSkipDraft(target, 2), prompts, max_new_tokens=24, k=3)
    assert got == [q4_plain(target, p, 24) for p in prompts]


def test_layerskip_on_q4_shares_the_targets_packed_weights(tmp_path):
    target = tiny_q4_target(tmp_path)
    draft = LayerSkipDraft(target, 2)
    assert draft.lm.stack.layers[0] is target.forward.stack.layers[0] and draft.lm.n_layers == 2
    assert target.forward.n_layers == 4


def exact_joint_34_q4(target, prompt, temperature, top_p):
    """Exact P(x3, x4) of plain sampling on the q4 forward, by enumeration, each token's
    distribution computed as plain decoding computes it: the prompt's forward (prefill
    kernels), then one token per forward (the int4 kernel)."""
    from scylla.decoding import logits_to_probs

    fwd, vocab = target.forward, target.model.config.vocab_size
    cache = fwd.new_cache(1, len(prompt) + 8)
    logits, _ = fwd.forward(torch.tensor([prompt]), cache)
    cache.keep(0, list(range(len(prompt))))
    base = len(prompt)

    def probs(logits):
        return logits_to_probs(logits[:, -1].double(), temperature, top_p)[0].double()

    def step(tokens):
        """The distribution after decoding `tokens` one at a time past the prompt."""
        cache.set_length(0, base)
        for tok in tokens:
            out, _ = fwd.forward(torch.tensor([[tok]]), cache)
            cache.keep(0, [0])
        return probs(out)

    joint = torch.zeros(vocab, vocab, dtype=torch.float64)
    p1 = probs(logits)
    for x1 in range(vocab):
        p2 = step([x1])
        for x2 in range(vocab):
            p3 = step([x1, x2])
            for x3 in range(vocab):
                joint[x3] += p1[x1] * p2[x2] * p3[x3] * step([x1, x2, x3])
    return joint.numpy()


@pytest.mark.parametrize("tree", [None, "tree:2,2,6"])
def test_sampling_on_q4_is_lossless(tree, tmp_path, one_thread):
    vocab = 6
    target = tiny_q4_target(tmp_path, vocab=vocab, layers=3, init_range=0.6, eos=99)
    target.model.generation_config.eos_token_id = None
    prompt = [2, 0, 3, 1, 5, 2, 0, 3, 1]
    draft = LayerSkipDraft(target, 1) if tree is None else SampledTreeDraft(vocab, seed=5)   # a branching tree with q
    counts = np.zeros((vocab, vocab))
    for i in range(1200):
        out, _ = generate_ids(target, draft, prompt, max_new_tokens=4, k=2, temperature=1.0, seed=i, tree=tree)
        counts[out[2], out[3]] += 1
    assert chisquare_p(counts, exact_joint_34_q4(target, prompt, 1.0, 1.0)) > 0.001


# ---------------------------------------------------------------- the real bundled file

@pytest.mark.real
def test_bundled_gguf_blocks_dequantize_to_the_cached_fp32_weights(real_target):
    """The q4 target reads the same numbers transformers dequantized: bit for bit."""
    from scylla.models import gguf_of

    c = real_target.model.config
    weights = load_gguf_weights(gguf_of("smollm2"), c.num_hidden_layers, c.num_attention_heads,
                                c.num_key_value_heads)
    for i in (0, 17, 29):
        layer = real_target.model.model.layers[i]
        for name, proj in (("q", layer.self_attn.q_proj), ("k", layer.self_attn.k_proj),
                           ("v", layer.self_attn.v_proj), ("down", layer.mlp.down_proj)):
            assert torch.equal(weights.layers[i][name].dequantize(), proj.weight.detach()), (i, name)
    assert torch.equal(weights.embed.dequantize(), real_target.model.model.embed_tokens.weight.detach())
    assert weights.head is weights.embed   # tied in the file, as in the model


@pytest.mark.real
def test_bundled_q4_target_speculates_losslessly_and_agrees_with_fp32(real_q4_target, real_target):
    from scylla.drafts import make_draft
    from scylla.models import encode_prompt

    assert real_q4_target.quant == "q4" and "int4" in real_q4_target.kernels
    ids = encode_prompt(real_q4_target, "List three uses of a hash map, one line each.")
    plain = q4_plain(real_q4_target, ids, 40)
    for spec, tree in (("scylla", "tree:2,3,5"), ("ngram", None)):
        got, _ = generate_ids(real_q4_target, make_draft(spec, real_q4_target), ids, max_new_tokens=40,
                              k=4, tree=tree)
        assert got == plain, spec
    fp32 = q4_plain(real_target, ids, 40)
    assert plain[:8] == fp32[:8]   # bf16 activations move late near-ties, not the opening
