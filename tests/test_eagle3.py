"""EAGLE-3 drafts: the architecture (training module = lean decode = a from-the-layout reference),
export in the layout vLLM and SGLang load (their loaders' name mapping applied here), import
back through --draft, and bad folders refused on one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from scylla import ScyllaError
from scylla.decoding import generate_ids
from scylla.drafts import make_draft
from scylla.head import HeadDraft, LeanHead, export_eagle3, load_head, load_head_draft, save_head
from scylla.lean import apply_rope, rope_table
from scylla.train import draft_vocab_map, make_head, train_head
from tests.conftest import tiny_target
from tests.test_engine import plain_greedy
from tests.test_head import feature_seqs, fit_one_batch, tiny_cfg

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    """A briefly trained eagle3-arch draft (so that it is accepted some of the time)."""
    folder = tmp_path_factory.mktemp("eagle3") / "draft"
    train_head(target, feature_seqs(target, n=30), tiny_cfg(tokens=1500, arch="eagle3"), folder, "tiny-llama",
               log=lambda *a: None)
    return folder


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return export_eagle3(trained, tmp_path_factory.mktemp("export") / "out")


def untrained_eagle3(target, vocab=48):
    seqs = feature_seqs(target, n=8)
    return make_head(target.model, tiny_cfg(arch="eagle3", draft_vocab=vocab),
                     draft_vocab_map(seqs, vocab, 96), "tiny")


# ---------------------------------------------------------------- the architecture

def reference_logits(tensors: dict, cfg: dict, features, embeds):
    """EAGLE-3's first layer written from the layout's names alone: [T, 3H] features and
    [T, H] token embeddings -> draft-vocabulary logits [T, V']."""
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, t = h // heads, cfg["rms_norm_eps"], features.shape[0]
    w = {k: v.to(features.dtype) for k, v in tensors.items() if v.is_floating_point()}
    norm = lambda x, name: F.rms_norm(x, (h,), w[name], eps)
    fused = features @ w["fc.weight"].T
    x = torch.cat([norm(embeds, "midlayer.input_layernorm.weight"), norm(fused, "midlayer.hidden_norm.weight")], -1)
    q = (x @ w["midlayer.self_attn.q_proj.weight"].T).view(t, heads, hd).transpose(0, 1)
    k = (x @ w["midlayer.self_attn.k_proj.weight"].T).view(t, kv, hd).transpose(0, 1)
    v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(t, kv, hd).transpose(0, 1)
    cos, sin = rope_table(hd, cfg["rope_theta"], t, "cpu")
    q, k = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype)), apply_rope(k, cos.to(q.dtype), sin.to(q.dtype))
    k, v = k.repeat_interleave(heads // kv, 0), v.repeat_interleave(heads // kv, 0)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(t, h)
    r = fused + o @ w["midlayer.self_attn.o_proj.weight"].T
    n = norm(r, "midlayer.post_attention_layernorm.weight")
    r = r + (F.silu(n @ w["midlayer.mlp.gate_proj.weight"].T) * (n @ w["midlayer.mlp.up_proj.weight"].T)) \
        @ w["midlayer.mlp.down_proj.weight"].T
    return norm(r, "norm.weight") @ w["lm_head.weight"].T


def test_training_forward_lean_decode_and_the_layout_agree(target, tmp_path):
    head = untrained_eagle3(target)
    save_head(head, tmp_path / "src")
    out = export_eagle3(tmp_path / "src", tmp_path / "out")
    seq = feature_seqs(target, n=1, length=12, seed=3)[0]
    feats, toks = seq["features"][:, :96].to(torch.float64), seq["tokens"]
    with torch.no_grad():
        trained = head.logits(head(head.step_inputs(feats[None, :-1], toks[None, 1:], fused=False)))[0]
    lean = LeanHead(head)
    cache = lean.new_cache()
    x = lean.step_inputs(feats[:-1], toks[1:], fused=False)
    decoded = lean.logits(lean.run(x, cache, torch.arange(11)))
    torch.testing.assert_close(decoded.double(), trained, rtol=1e-6, atol=1e-6)
    cfg = json.loads((out / "config.json").read_text())
    ref = reference_logits(load_file(str(out / "model.safetensors")), cfg, feats[:-1],
                           target.model.get_input_embeddings().weight[toks[1:]])
    torch.testing.assert_close(ref, trained, rtol=1e-6, atol=1e-6)


def test_eagle3_arch_needs_one_layer_multi_fusion_and_a_draft_vocabulary(target):
    from scylla.train import check_train_config

    for bad in (dict(layers=2), dict(fusion="last"), dict(draft_vocab=0), dict(arch="medusa")):
        with pytest.raises(ScyllaError, match="arch"):
            check_train_config(tiny_cfg(**({"arch": "eagle3"} | bad)))


def test_default_arch_drafts_load_and_decode_as_before(target, tmp_path):
    """A saved draft without `arch` in its config (every draft saved before) is the eagle arch."""
    head = make_head(target.model, tiny_cfg(), None, "tiny")
    save_head(head, tmp_path / "old")
    raw = json.loads((tmp_path / "old" / "config.json").read_text())
    assert raw.pop("arch") == "eagle"
    (tmp_path / "old" / "config.json").write_text(json.dumps(raw))
    loaded = load_head(tmp_path / "old", target.model)
    assert loaded.cfg.arch == "eagle" and loaded.fc is not None
    shipped = json.loads((ROOT / "assets" / "drafts" / "eagle2-style" / "config.json").read_text())
    assert "arch" not in shipped or shipped["arch"] == "eagle"


# ---------------------------------------------------------------- the layout, as the engines read it

def stacked(name: str):
    """vLLM's and SGLang's stacked_params_mapping: (merged name, shard) or None."""
    for part, merged, shard in ((".q_proj", ".qkv_proj", "q"), (".k_proj", ".qkv_proj", "k"),
                                (".v_proj", ".qkv_proj", "v"), (".gate_proj", ".gate_up_proj", 0),
                                (".up_proj", ".gate_up_proj", 1)):
        if part in name:
            return name.replace(part, merged), shard
    return None


def engine_params(cfg: dict, layer: str) -> dict[str, tuple]:
    """The draft model's parameters (name -> shape) as the engine builds them from config.json,
    less the embedding, which both engines take from the target."""
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, inter = cfg.get("head_dim") or h // heads, cfg["intermediate_size"]
    p = f"model.{layer}."
    return {p + "self_attn.qkv_proj.weight": ((heads + 2 * kv) * hd, 2 * h),
            p + "self_attn.o_proj.weight": (h, heads * hd),
            p + "mlp.gate_up_proj.weight": (2 * inter, h), p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "hidden_norm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            "model.fc.weight": (h, 3 * cfg.get("target_hidden_size", h)), "model.norm.weight": (h,),
            "lm_head.weight": (cfg["draft_vocab_size"], h)}


def shard_shape(cfg: dict, shard, full: tuple) -> tuple:
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    rows = {"q": heads * hd, "k": kv * hd, "v": kv * hd, 0: full[0] // 2, 1: full[0] // 2}[shard]
    return (rows, full[1])


def vllm_names(name: str) -> str:
    """Eagle3LlamaForCausalLM.load_weights, then LlamaModel.load_weights' midlayer rename."""
    if "lm_head" not in name:
        name = "model." + name
    return name.replace("midlayer.", "layers.0.")


def sglang_names(name: str) -> str:
    """LlamaForCausalLMEagle3.load_weights: `model.` added where the bare name is not a parameter."""
    return name if name.startswith("lm_head") else "model." + name


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_every_exported_tensor_is_consumed_with_its_shape_and_none_is_missing(exported, engine):
    cfg = json.loads((exported / "config.json").read_text())
    tensors = load_file(str(exported / "model.safetensors"))
    params = engine_params(cfg, "layers.0" if engine == "vllm" else "midlayer")
    rename = vllm_names if engine == "vllm" else sglang_names
    filled: dict[str, set] = {name: set() for name in params}
    for name, tensor in tensors.items():
        if name == "t2d":      # both loaders skip it (d2t carries the map)
            continue
        if name == "d2t":      # vLLM: draft_id_to_target_id; SGLang: hot_token_id = d2t + arange
            assert tensor.dtype == torch.int64 and tensor.shape == (cfg["draft_vocab_size"],)
            continue
        merged = stacked(name)
        if merged:
            param, shard = merged
            param = rename(param)
            assert param in params, f"{engine}: {name} -> {param} is no parameter"
            assert tuple(tensor.shape) == shard_shape(cfg, shard, params[param]), name
            assert shard not in filled[param]
            filled[param].add(shard)
        else:
            param = rename(name)
            assert param in params, f"{engine}: {name} -> {param} is no parameter"
            assert tuple(tensor.shape) == params[param], name
            filled[param].add("all")
    missing = [p for p, got in filled.items() if not got or ("qkv" in p and len(got) != 3)
               or ("gate_up" in p and len(got) != 2)]
    assert not missing, f"{engine}: parameters never loaded: {missing}"


def test_config_names_the_layout_and_the_feature_layers_twice(exported, trained):
    cfg = json.loads((exported / "config.json").read_text())
    src = json.loads((trained / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is False
    assert cfg["vocab_size"] == 96 and cfg["draft_vocab_size"] == src["draft_vocab"] == 48
    assert cfg["target_hidden_size"] == cfg["hidden_size"] == 32
    n = src["target_layers"]
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, n // 2, n - 3]                    # vLLM
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, n // 2 - 1, n - 4]  # SGLang
    tensors = load_file(str(exported / "model.safetensors"))
    assert not any("embed" in k for k in tensors)
    ids = tensors["d2t"] + torch.arange(48)                  # SGLang's hot_token_id
    assert torch.equal(ids, load_file(str(trained / "model.safetensors"))["d2t"])
    assert tensors["t2d"].dtype == torch.bool and tensors["t2d"].shape == (96,)
    assert tensors["t2d"].sum() == 48 and tensors["t2d"][ids].all()


# ---------------------------------------------------------------- loading back

def test_exported_draft_loads_back_and_decodes_the_same_tokens(target, trained, exported):
    prompt = [5, 9, 14, 3, 22, 7, 5, 9]
    source = load_head_draft(trained, target, "source")
    back = make_draft(str(exported), target)
    assert isinstance(back, HeadDraft) and back.head.cfg.arch == "eagle3"
    want = plain_greedy(target, prompt, 24)
    for kwargs in (dict(k=4), dict(k=4, tree="tree:3,2,6")):
        got_src, steps_src = generate_ids(target, source, prompt, max_new_tokens=24, **kwargs)
        got_back, steps_back = generate_ids(target, back, prompt, max_new_tokens=24, **kwargs)
        assert got_src == got_back == want
        assert [s.accepted for s in steps_src] == [s.accepted for s in steps_back]
        assert [s.drafted for s in steps_src] == [s.drafted for s in steps_back]
    assert sum(s.accepted for s in steps_src) > 0  # the comparison covers accepted drafts


def test_a_default_arch_draft_is_refused_with_one_line(target, tmp_path):
    save_head(make_head(target.model, tiny_cfg(), None, "tiny"), tmp_path / "old")
    with pytest.raises(ScyllaError, match="only an eagle3-arch draft exports") as err:
        export_eagle3(tmp_path / "old", tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_a_non_empty_output_folder_is_refused_unless_forced(target, trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ScyllaError, match="not empty; pass --force"):
        export_eagle3(trained, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export_eagle3(trained, out, force=True)
    assert (out / "model.safetensors").is_file()


def broken_copies(exported: Path, tmp: Path):
    """(name, folder) pairs of EAGLE-3 folders broken one way each."""
    cfg = json.loads((exported / "config.json").read_text())
    tensors = load_file(str(exported / "model.safetensors"))

    def copy(name, cfg_change=None, drop=None, add=None, weights=True):
        folder = tmp / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**cfg, **(cfg_change or {})}))
        if weights:
            kept = {k: v for k, v in tensors.items() if k != drop}
            save_file({**kept, **(add or {})}, str(folder / "model.safetensors"))
        return name, folder

    yield copy("no-weights", weights=False)
    yield copy("missing-tensor", drop="midlayer.hidden_norm.weight")
    yield copy("unknown-tensor", add={"layers.1.mlp.up_proj.weight": torch.zeros(2, 2)})
    yield copy("two-layers", {"num_hidden_layers": 2})
    yield copy("wrong-hidden", {"hidden_size": 64})
    yield copy("wrong-vocab", {"vocab_size": 100})
    yield copy("bad-layer-ids", {"eagle_aux_hidden_state_layer_ids": [1, 2, 99]})
    yield copy("lacks-fields", {"intermediate_size": None})
    yield copy("bad-d2t", add={"d2t": torch.full((48,), 500, dtype=torch.long)})
    twice = tensors["d2t"].clone()
    twice[1] = tensors["d2t"][0] - 1          # draft ids 0 and 1 both land on one target id
    yield copy("duplicate-d2t", add={"d2t": twice})
    folder = tmp / "not-safetensors"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(b"\x80\x04pickled?")
    yield "not-safetensors", folder


def test_malformed_eagle3_folders_are_refused_with_one_line(target, exported, tmp_path):
    for name, folder in broken_copies(exported, tmp_path):
        with pytest.raises(ScyllaError) as err:
            make_draft(str(folder), target)
        assert "\n" not in str(err.value), name
        assert str(folder) in str(err.value) or "EAGLE-3" in str(err.value), (name, str(err.value))
        assert name != "duplicate-d2t" or "two draft ids" in str(err.value)


def test_the_shipped_scylla_exported_decodes_exactly_as_shipped(real_target, tmp_path):
    """The shipped draft (EAGLE-3 architecture) through the vLLM/SGLang layout and back:
    the same tokens and the same accepted length at every step, on the real target."""
    from scylla.head import named_draft_dir
    from scylla.models import encode_prompt

    exported = export_eagle3(named_draft_dir("scylla"), tmp_path / "served")
    prompt = encode_prompt(real_target, "Write a short note inviting the team to a Friday lunch.")
    runs = [generate_ids(real_target, make_draft(spec, real_target), prompt, max_new_tokens=32, k=4)
            for spec in ("scylla", str(exported))]
    (ids_a, steps_a), (ids_b, steps_b) = runs
    assert ids_a == ids_b
    assert [len(s.emitted) for s in steps_a] == [len(s.emitted) for s in steps_b]
    assert sum(len(s.emitted) for s in steps_a[1:]) > len(steps_a) - 1   # some drafts were accepted


# ---------------------------------------------------------------- the command line

def scylla(*args):
    return subprocess.run([sys.executable, "-m", "scylla.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_export_draft_command(trained, tmp_path):
    out = tmp_path / "served"
    done = scylla("export-draft", str(trained), "--format", "eagle3", "--out", str(out))
    assert done.returncode == 0, done.stderr[-500:]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]
    again = scylla("export-draft", str(trained), "--format", "eagle3", "--out", str(out))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--force" in again.stderr
    assert scylla("export-draft", str(trained), "--format", "eagle3", "--out", str(out), "--force").returncode == 0
    no_out = scylla("export-draft", str(trained), "--format", "eagle3")
    assert no_out.returncode == 2 and no_out.stderr.count("\n") == 1 and "--out" in no_out.stderr
    shipped = scylla("export-draft", "eagle2-style", "--format", "eagle3", "--out", str(tmp_path / "e2"))
    assert shipped.returncode == 2 and shipped.stderr.count("\n") == 1 and "eagle3-arch" in shipped.stderr
    bad = scylla("export-draft", str(trained), "--format", "gguf", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_eagle3_training_steps_lower_the_loss(target):
    from scylla.train import collate, feature_columns, last_columns

    seqs = feature_seqs(target)
    cfg = tiny_cfg(arch="eagle3")
    vocab_ids = draft_vocab_map(seqs, 48, 96)
    head = make_head(target.model, cfg, vocab_ids, "tiny")
    t2d = torch.full((96,), -100, dtype=torch.long)
    t2d[vocab_ids] = torch.arange(48)
    cols = feature_columns("multi", 32)
    batch = collate(seqs[:4], cols, last_columns(cols))
    first, last = fit_one_batch(head, batch, t2d, cfg, steps=30)
    assert last < 0.7 * first


@pytest.mark.parametrize("train,layers,needle", [
    ('arch = "medusa"', "[1]", "unknown draft arch"),
    ('arch = "eagle3"', "[1, 2]", "one layer"),
    ('arch = "eagle3"\nfusion = "last"', "[1]", "multi fusion"),
])
def test_a_sweep_refuses_impossible_eagle3_trainings_before_any_work(tmp_path, train, layers, needle):
    from scylla.sweep import load_config

    path = tmp_path / "s.toml"
    path.write_text(f'[grid]\ntokens = [4096]\nlayers = {layers}\n[train]\n{train}\n')
    with pytest.raises(ScyllaError, match=needle):
        load_config(str(path))
    path.write_text('[grid]\ntokens = [4096]\n[train]\narch = "eagle3"\n')
    assert load_config(str(path)).train["arch"] == "eagle3"
