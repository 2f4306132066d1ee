import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.models import build_model


def make(attention="general", input_feeding=False, tie=True, layers=2):
    torch.manual_seed(0)
    cfg = ModelConfig(
        embedding_size=16,
        hidden_size=24,
        num_layers=layers,
        dropout=0.0,
        attention=attention,
        input_feeding=input_feeding,
        tie_embeddings=tie,
    )
    return build_model(model_cfg=cfg, src_vocab_size=40, tgt_vocab_size=50).eval()


def batch(seed=0, b=4, s=7, t=6):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 40, (b, s), generator=g)
    lens = torch.tensor([s, 3, 5, 1][:b])
    for i, n in enumerate(lens):
        src[i, n:] = 0
    tgt = torch.randint(4, 50, (b, t), generator=g)
    return src, lens, tgt


@pytest.mark.parametrize("attention", ["dot", "general", "mlp"])
@pytest.mark.parametrize("input_feeding", [False, True])
def test_shapes_and_loss(attention, input_feeding):
    m = make(attention, input_feeding)
    src, lens, tgt = batch()
    feats = m.features(src, lens, tgt)
    assert feats.shape == (4, 6, 16)
    tgt_out = tgt.clone()
    tgt_out[1, 3:] = 0
    loss, n = m(src, lens, tgt, tgt_out)
    assert int(n) == 4 * 6 - 3 and torch.isfinite(loss) and loss > 0


@pytest.mark.parametrize("attention", ["dot", "general", "mlp"])
def test_padding_never_changes_real_positions(attention):
    m = make(attention)
    src, lens, tgt = batch()
    padded_src = torch.cat([src, torch.zeros(4, 5, dtype=torch.long)], 1)
    padded_tgt = torch.cat([tgt, torch.zeros(4, 3, dtype=torch.long)], 1)
    enc_a, _, st_a = m.encode(src, lens)
    enc_b, _, st_b = m.encode(padded_src, lens)
    for i, n in enumerate(lens):
        torch.testing.assert_close(enc_a[i, :n], enc_b[i, :n])
    torch.testing.assert_close(st_a[0], st_b[0])
    torch.testing.assert_close(m.features(src, lens, tgt), m.features(padded_src, lens, padded_tgt)[:, :6])
    # Each sentence is independent of its batch-mates.
    alone = m.features(src[1:2, :3], lens[1:2], tgt[1:2])
    torch.testing.assert_close(alone, m.features(src, lens, tgt)[1:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("input_feeding", [False, True])
def test_beam_one_equals_greedy(input_feeding):
    m = make(input_feeding=input_feeding)
    src, lens, _ = batch(seed=3)
    assert m.beam_search(src, lens, max_len=12, beam_size=1) == m.greedy(src, lens, max_len=12)


def test_beam_finds_at_least_greedy_score():
    m = make()
    src, lens, _ = batch(seed=5)

    def score(i, hyp):  # log-probability of a hypothesis + EOS under the model
        tgt_in = torch.tensor([[m.bos_id] + hyp])
        tgt_out = torch.tensor([hyp + [m.eos_id]])
        loss, _ = m(src[i : i + 1, : lens[i]], lens[i : i + 1], tgt_in, tgt_out)
        return -float(loss)

    greedy = m.greedy(src, lens, max_len=40)
    beam = m.beam_search(src, lens, max_len=40, beam_size=5, length_penalty=0.0)
    for i in range(4):
        if len(greedy[i]) < 39 and len(beam[i]) < 39:
            assert score(i, beam[i]) >= score(i, greedy[i]) - 1e-4


def test_tied_embeddings_share_weights():
    m = make(tie=True)
    assert m.decoder.generator.weight is m.decoder.embedding.weight
    untied = make(tie=False)
    assert untied.decoder.generator.weight is not untied.decoder.embedding.weight


def test_training_reduces_loss():
    m = make().train()
    src, lens, tgt = batch()
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    first = None
    for _ in range(60):
        loss, n = m(src, lens, tgt, tgt)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
        first = first if first is not None else float(loss.detach() / n)
    assert float(loss.detach() / n) < first * 0.75


@pytest.mark.parametrize("input_feeding", [False, True])
def test_greedy_attention_is_greedy_with_its_weights(input_feeding):
    """The same ids as greedy; one row per output token (and EOS when emitted) over the real
    source positions only, each a distribution."""
    m = make("general", input_feeding)
    src, lens, _ = batch(seed=3)
    ids, weights = m.greedy_attention(src, lens, 9)
    assert ids == m.greedy(src, lens, 9)
    for i, w, n in zip(ids, weights, lens.tolist()):
        assert w.shape[1] == n and w.shape[0] in (len(i), len(i) + 1)
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5)


def test_frame_shift_moves_each_clip_as_a_whole_in_training_only():
    """model.frame_shift: in training each clip is moved by one random offset (up to the
    shift) for all its frames, so its motion is kept; evaluation sees the frames as they are."""
    from pipeline.models.seq2seq import FrameInput

    torch.manual_seed(0)
    b, k, s = 6, 4, 3
    frames = torch.rand(b * k, 3, 16, 16)
    net = FrameInput("frames", 8, 0.0, shift=s)
    moved = net._shifted(frames, b).reshape(b, k, 3, 16, 16)
    padded = torch.nn.functional.pad(frames.reshape(b, -1, 16, 16), (s, s, s, s), mode="reflect")
    offsets = []
    for i in range(b):
        fits = [
            (y, x)
            for y in range(2 * s + 1)
            for x in range(2 * s + 1)
            if torch.equal(padded[i, :, y : y + 16, x : x + 16].reshape(k, 3, 16, 16), moved[i])
        ]
        assert len(fits) == 1, (i, fits)  # one offset for every frame of the clip
        offsets.append(fits[0])
    assert len(set(offsets)) > 1  # clips are moved independently
    clips = torch.randint(0, 256, (2, k, 16, 16, 3), dtype=torch.uint8)
    net.eval()
    unshifted = FrameInput("frames", 8, 0.0, shift=0).eval()
    unshifted.load_state_dict(net.state_dict())
    assert torch.equal(net(clips), unshifted(clips))
    net.train()
    torch.manual_seed(1)
    assert not torch.equal(net(clips), unshifted.train()(clips))
