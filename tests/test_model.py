"""model.py against transformers.LlamaForCausalLM: same weights, same logits."""

import math

import pytest
import torch

from model import ModelConfig, Transformer, from_hf_state_dict, to_hf_state_dict

transformers = pytest.importorskip("transformers")


def hf_config(cfg: ModelConfig):
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
    )


def random_configs():
    g = torch.Generator().manual_seed(0)
    shapes = [  # (n_heads, n_kv_heads, head_dim, tied, theta)
        (4, 2, 16, True, 1e4),  # GQA, tied
        (4, 4, 16, False, 1e6),  # MHA, untied
        (3, 1, 8, False, 1e4),  # odd head count, MQA
        (6, 3, 12, True, 1e6),  # odd kv heads
        (5, 5, 8, True, 5e5),
    ]
    for nh, nkv, hd, tied, theta in shapes:
        n_layers = int(torch.randint(1, 4, (1,), generator=g))
        vocab = int(torch.randint(50, 300, (1,), generator=g))
        ffn = int(torch.randint(16, 200, (1,), generator=g))
        yield ModelConfig(vocab_size=vocab, dim=nh * hd, n_layers=n_layers, n_heads=nh, n_kv_heads=nkv,
                          ffn_dim=ffn, max_seq_len=64, rope_theta=theta, tie_embeddings=tied, norm_eps=1e-6)


@pytest.mark.parametrize("cfg", list(random_configs()), ids=lambda c: f"h{c.n_heads}kv{c.n_kv_heads}t{int(c.tie_embeddings)}")
def test_logits_equal_hf_llama(cfg):
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(hf_config(cfg)).eval()
    ours = Transformer(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    idx = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)
    assert (got - ref).abs().max().item() <= 1e-5
    # and back: our weights under HF names load into HF with nothing missing or unexpected
    hf2 = transformers.LlamaForCausalLM(hf_config(cfg)).eval()
    missing, unexpected = hf2.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if cfg.tie_embeddings:
        hf2.tie_weights()
    with torch.no_grad():
        assert (hf2(idx).logits - got).abs().max().item() <= 1e-5


def test_param_names_map_one_to_one():
    cfg = ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=False)
    hf_names = set(transformers.LlamaForCausalLM(hf_config(cfg)).state_dict())
    assert set(to_hf_state_dict(Transformer(cfg))) == hf_names


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=64)
    m = Transformer(cfg).eval()
    prompt = torch.randint(0, 97, (10,)).tolist()
    cached = list(m.generate(prompt, 20, temperature=0))
    seq = list(prompt)
    for _ in range(20):  # no cache: the whole sequence every step
        seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt):]


def test_cached_prefix_then_chunk_equals_full_forward():
    from model import KVCache
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    m = Transformer(cfg).eval()
    idx = torch.randint(0, 50, (1, 20))
    with torch.no_grad():
        full = m(idx)
        cache = KVCache(cfg, 1, 20, "cpu", torch.float32)
        first = m(idx[:, :12], cache, 0)
        rest = m(idx[:, 12:], cache, 12)
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5)


def test_flops_per_token_hand_count():
    cfg = ModelConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, tie_embeddings=True)
    m = Transformer(cfg)
    hd = 16
    attn = 64 * (4 * hd + 2 * 2 * hd) + 4 * hd * 64
    mlp = 3 * 64 * 128
    matmul = 2 * (attn + mlp) + 1000 * 64  # layers + output head (tied, counted once as a matmul)
    T = 256
    assert m.flops_per_token(T) == 6 * matmul + 12 * 2 * 4 * hd * T


def test_residual_projections_scaled_init():
    cfg = ModelConfig(vocab_size=100, dim=256, n_layers=8, n_heads=4)
    m = Transformer(cfg)
    std_o = m.model.layers[0].self_attn.o_proj.weight.std().item()
    std_q = m.model.layers[0].self_attn.qkv_proj.weight.std().item()
    assert abs(std_q - 0.02) < 0.002
    assert abs(std_o - 0.02 / math.sqrt(16)) < 0.001


def test_batched_generation_equals_one_prompt_at_a_time():
    """Prompts of different lengths sampled together (one KV cache, each row after its own prompt) give what each
    gives alone: greedy tokens, the stop token kept, max_new_tokens and the context respected."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)).eval()
    for p in model.parameters():
        p.data += 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    prompts = [torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 3, 40)]
    alone = [list(model.generate(p, 30, temperature=0)) for p in prompts]
    stop = alone[0][2]  # a token the first prompt's reply reaches: it stops there, the others may too
    alone = [list(model.generate(p, 30, temperature=0, stop_ids=(stop,))) for p in prompts]
    batched = model.generate_batch(prompts, 30, temperature=0, stop_ids=(stop,))
    assert batched == alone
    assert batched[0][-1] == stop and len(batched[0]) < 30
    assert len(batched[3]) <= 64 - 40  # the long prompt ran into the context
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert model.generate_batch(prompts, 10, generator=g1) == model.generate_batch(prompts, 10, generator=g2)
