
import pytest
import torch
import torch.nn.functional as F

from llama import KVCache, Llama, LlamaConfig
from llama.model import RMSNorm


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.from_preset("tiny", **overrides)).eval()


def random_ids(model, batch, length, seed=1):
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_shape_and_public_api():
    model = make_model()
    ids = random_ids(model, 3, 17)
    assert model(ids).shape == (3, 17, model.config.vocab_size)
    assert model.lm_head.weight is model.embed_tokens.weight  # tiny preset ties embeddings


@torch.no_grad()
def test_causality_future_tokens_never_change_past_logits():
    model = make_model()
    ids = random_ids(model, 2, 40)
    logits = model(ids)
    for t in (0, 13, 38):
        changed = ids.clone()
        changed[:, t + 1:] = random_ids(model, 2, 40 - t - 1, seed=t + 7)
        assert not torch.equal(changed, ids)
        assert torch.equal(model(changed)[:, :t + 1], logits[:, :t + 1])


@torch.no_grad()
def test_kv_cache_token_by_token_equals_full_forward():
    model = make_model()
    ids = random_ids(model, 2, 48)
    full = model(ids)
    cache = KVCache(model.config, batch_size=2, max_len=64)
    keys, values = cache.keys, cache.values
    steps = [model(ids[:, :8], cache)] + [model(ids[:, t:t + 1], cache) for t in range(8, 48)]
    assert cache.length == 48
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5
    # preallocated: decoding wrote into the same buffers instead of growing new ones
    assert cache.keys is keys and cache.values is values and keys.shape[3] == 64


@torch.no_grad()
def test_kv_cache_in_chunks_equals_full_forward():
    model = make_model()
    ids = random_ids(model, 1, 30)
    cache = KVCache(model.config, batch_size=1)
    chunks = [model(ids[:, a:b], cache) for a, b in ((0, 11), (11, 12), (12, 25), (25, 30))]
    assert (torch.cat(chunks, dim=1) - model(ids)).abs().max() <= 1e-5
    cache.reset()
    assert (model(ids[:, :5], cache) - model(ids[:, :5])).abs().max() <= 1e-5


@torch.no_grad()
def test_kv_cache_rows_at_their_own_positions_decode_as_each_alone():
    """Continuous batching's cache: each row prefilled alone through a view, then decoded together,
    each at its own position (positions [B, 1]) under a mask over the buffer."""
    model = make_model()
    seqs = [random_ids(model, 1, 19, seed=2)[0], random_ids(model, 1, 30, seed=3)[0]]
    prompts = (9, 20)
    cache = KVCache(model.config, batch_size=2, max_len=40)
    for row, (seq, n) in enumerate(zip(seqs, prompts)):
        view = cache.view(slice(row, row + 1))
        assert (model(seq[None, :n], view) - model(seq[None, :n])).abs().max() <= 1e-5
        assert view.length == n and cache.length == 0  # the view counts its own length
    lengths = torch.tensor(prompts)
    for step in range(10):
        cache.positions = lengths[:, None]
        mask = torch.arange(cache.max_len)[None, None, :] <= lengths[:, None, None]
        logits = model(torch.stack([seq[lengths[row]] for row, seq in enumerate(seqs)])[:, None], cache, mask)
        for row, seq in enumerate(seqs):
            alone = model(seq[None, :lengths[row] + 1])[0, -1]
            assert (logits[row, -1] - alone).abs().max() <= 1e-5, (step, row)
        lengths += 1


@torch.no_grad()
def test_grouped_query_attention_equals_multi_head_with_repeated_kv_heads():
    gqa = make_model(num_heads=8, num_kv_heads=2, hidden_size=64)
    mha = Llama(LlamaConfig.from_preset("tiny", num_heads=8, num_kv_heads=8, hidden_size=64)).eval()
    groups, head_dim = 4, gqa.config.head_dim
    state = {}
    for name, weight in gqa.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # [kv_heads * d, hidden] -> [heads * d, hidden]
            weight = weight.view(-1, head_dim, weight.shape[1]).repeat_interleave(groups, dim=0).flatten(0, 1)
        state[name] = weight
    mha.load_state_dict(state)
    ids = random_ids(gqa, 2, 33)
    assert (gqa(ids) - mha(ids)).abs().max() <= 1e-5


def test_rmsnorm_computes_in_float32_for_bf16_input():
    norm = RMSNorm(64, eps=1e-5).to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16) * 30
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.rms_norm(x.float(), (64,), eps=1e-5).to(torch.bfloat16))


@torch.no_grad()
def test_bf16_model_tracks_fp32():
    model = make_model()
    ids = random_ids(model, 2, 32)
    fp32 = model(ids)
    bf16 = model.to(torch.bfloat16)(ids)
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_scaled_init_for_residual_projections():
    torch.manual_seed(0)
    config = LlamaConfig.from_preset("tiny", hidden_size=256, num_heads=4, num_kv_heads=4,
                                     intermediate_size=512, num_layers=8)
    model = Llama(config)
    layer = model.layers[3]
    for weight, std in ((layer.self_attn.o_proj.weight, config.init_std / 4),  # sqrt(2 * 8) = 4
                        (layer.mlp.down_proj.weight, config.init_std / 4),
                        (layer.self_attn.q_proj.weight, config.init_std),
                        (model.embed_tokens.weight, config.init_std)):
        assert weight.std().item() == pytest.approx(std, rel=0.05)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(256))


def test_parameter_count_and_flops():
    model = make_model()
    c = model.config
    per_layer = (c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
                 + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size)
    embedding = c.vocab_size * c.hidden_size
    assert model.num_params() == embedding + c.num_layers * per_layer + c.hidden_size  # tied head
    assert model.num_params(exclude_embeddings=True) == model.num_params() - embedding
    matmul = c.num_layers * (per_layer - 2 * c.hidden_size) + embedding  # the tied head still multiplies
    assert model.flops_per_token(128) == 6 * matmul + 12 * c.num_layers * c.num_heads * c.head_dim * 128


def test_bad_input_gets_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match=r"^token id 512 is out of range for vocab_size 512 \(ids must be in \[0, 511\]\)$"):
        model(torch.tensor([[1, 2, 512]]))
    with pytest.raises(ValueError, match=r"^token id -1 is out of range for vocab_size 512"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"^sequence length 257 exceeds the limit of 256 positions \(max_seq_len\)$"):
        model(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^input_ids must be an integer tensor of shape \[batch, seq_len\], "
                                         r"got dtype torch.float32 and shape \(1, 3\)$"):
        model(torch.zeros(1, 3))
    cache = KVCache(model.config, batch_size=1, max_len=8)
    model(torch.zeros(1, 6, dtype=torch.long), cache)
    with pytest.raises(ValueError, match=r"^sequence length 9 exceeds the limit of 8 positions \(KV cache max_len\)$"):
        model(torch.zeros(1, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match=r"^KVCache max_len=300 exceeds the model's max_seq_len=256$"):
        KVCache(model.config, batch_size=1, max_len=300)


@torch.no_grad()
def test_matches_the_articles_model(article_llama):
    config = article_llama.LlamaConfig(vocab_size=500, hidden_size=96, intermediate_size=256,
                                       num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                       max_position_embeddings=128)
    torch.manual_seed(0)
    theirs = article_llama.LlamaForPretraining(config).eval()
    ours = Llama(LlamaConfig(vocab_size=500, hidden_size=96, intermediate_size=256, num_layers=2, num_heads=6,
                             num_kv_heads=2, max_seq_len=128)).eval()
    ours.load_state_dict({k.removeprefix("base_model."): v for k, v in theirs.state_dict().items()
                          if "rotary_emb" not in k})
    ids = torch.randint(0, 500, (2, 100))
    assert (ours(ids) - theirs(ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_loss_equals_masked_cross_entropy_on_full_logits_with_the_same_gradients(tied):
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", tie_word_embeddings=tied))
    ids = random_ids(model, 3, 100)  # 300 rows: several chunks of 128, the last one partial
    targets = random_ids(model, 3, 100, seed=2)
    mask = torch.rand(3, 100, generator=torch.Generator().manual_seed(3)) < 0.6
    targets[~mask] = -100  # uncounted targets may hold anything, as pad positions do

    per_token = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten().clamp(min=0), reduction="none")
    expected = (per_token * mask.flatten()).sum() / mask.sum()
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    loss = model.loss(ids, targets, mask)
    loss.backward()
    assert torch.allclose(loss, expected, atol=1e-6, rtol=0)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected_grads[name], atol=1e-6, rtol=1e-4), name
    with torch.no_grad():
        assert torch.allclose(model.loss(ids, targets, mask, reduction="sum"), expected * mask.sum(), rtol=1e-6)
    unmasked = F.cross_entropy(model(ids).flatten(0, 1), random_ids(model, 3, 100, seed=2).flatten())
    assert torch.allclose(model.loss(ids, random_ids(model, 3, 100, seed=2)), unmasked, atol=1e-6, rtol=0)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_compiled_training_step_has_the_eager_gradients_in_one_graph(tied, masked, device):
    """torch 2.11 on CUDA traced the hand-made gradients of the chunked loss into zeros: a compiled run
    then trained nothing. Compiled whole (fullgraph: no graph break), the loss must give the eager
    gradients, with a tied or an untied head, with or without a loss mask."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", num_layers=1, tie_word_embeddings=tied)).to(device).train()
    ids, targets = random_ids(model, 2, 64).to(device), random_ids(model, 2, 64, seed=2).to(device)
    mask = (torch.rand(2, 64, generator=torch.Generator().manual_seed(3)) < 0.5).to(device) if masked else None

    def gradients(loss_of):
        model.zero_grad(set_to_none=True)
        loss_of(ids, targets, mask, reduction="sum").backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    eager = gradients(model.loss)
    compiled = gradients(torch.compile(model.loss, fullgraph=True))
    for name, grad in eager.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(compiled[name], grad, atol=1e-5, rtol=1e-4), name


def test_the_chunked_loss_under_autocast_multiplies_in_bf16_and_keeps_float32_gradients():
    """Under autocast the op multiplies in bf16, as autocast would, and sums the head's gradient over
    the chunks in float32: it matches cross-entropy on bf16 logits, and the gradients keep the weights' dtype."""
    from llama.linear_cross_entropy import linear_cross_entropy

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 64, generator=generator, requires_grad=True)  # 3 chunks of 128, the last partial
    weight = (0.1 * torch.randn(512, 64, generator=generator)).requires_grad_()
    targets = torch.randint(0, 512, (300,), generator=generator)
    weights = (torch.rand(300, generator=generator) < 0.7).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, weights)
    loss.backward()
    logits = (hidden.detach().bfloat16() @ weight.detach().bfloat16().T).float()
    expected = (F.cross_entropy(logits, targets, reduction="none") * weights).sum()
    assert loss.dtype == torch.float32 and torch.allclose(loss, expected, rtol=1e-5)
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    exact_hidden, exact_weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    (F.cross_entropy(exact_hidden @ exact_weight.T, targets, reduction="none") * weights).sum().backward()
    for ours, exact in ((hidden.grad, exact_hidden.grad), (weight.grad, exact_weight.grad)):  # bf16 rounding only
        assert (ours - exact).abs().max() <= 0.02 * exact.abs().max()


def test_the_gpus_fused_chunk_arithmetic_equals_the_eager_one():
    """On a GPU the arithmetic between a chunk's two matmuls runs compiled (it would be ten passes over the
    logits run one by one); compiled here on the CPU, it must give the eager version's loss and gradient."""
    from llama.linear_cross_entropy import _fused_logit_gradient, _logit_gradient

    generator = torch.Generator().manual_seed(0)
    for rows, dtype in ((128, torch.bfloat16), (44, torch.bfloat16), (100, torch.float32)):  # a last, short chunk
        logits = (4 * torch.randn(rows, 512, generator=generator)).to(dtype)
        targets = torch.randint(0, 512, (rows,), generator=generator)
        weights = (torch.rand(rows, generator=generator) < 0.7).float()
        loss, grad = _fused_logit_gradient()(logits, targets, weights)
        expected_loss, expected_grad = _logit_gradient(logits.clone(), targets, weights)
        assert grad.dtype == dtype and torch.allclose(loss, expected_loss, rtol=1e-5)
        assert torch.allclose(grad.float(), expected_grad.float(), atol=1e-6 if dtype == torch.float32 else 4e-3)


def test_loss_rejects_bad_targets():
    model = make_model()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^targets shape \(1, 3\) must equal input_ids shape \(1, 4\)$"):
        model.loss(ids, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^target id 600 is out of range for vocab_size 512$"):
        model.loss(ids, torch.tensor([[1, 2, 3, 600]]))
    with pytest.raises(ValueError, match=r"^reduction must be 'mean' or 'sum', got 'none'$"):
        model.loss(ids, ids, reduction="none")


@torch.no_grad()
def test_explicit_attention_mask():
    model = make_model()
    a, b = random_ids(model, 1, 12, seed=5), random_ids(model, 1, 20, seed=6)
    causal = torch.ones(32, 32, dtype=torch.bool).tril()
    packed = torch.cat([a, b], dim=1)
    assert (model(packed, attn_mask=causal[None]) - model(packed)).abs().max() <= 1e-6
    # two documents packed in one row, each attending only to itself, equal each run alone
    doc = torch.tensor([0] * 12 + [1] * 20)
    separate = causal & (doc[:, None] == doc[None, :])
    logits = model(packed, attn_mask=separate[None])
    assert (logits[:, :12] - model(a)).abs().max() <= 1e-5
    assert (logits[:, 12:] - model(b)).abs().max() <= 1e-5  # RoPE sees only relative positions
    with pytest.raises(ValueError, match=r"^attn_mask must be a bool tensor of shape \[batch, seq_len, cached \+ "
                                         r"seq_len\] = \[1, 32, 32\], got dtype torch.float32 and shape \[32, 32\]$"):
        model(packed, attn_mask=causal.float())
