import math

import torch
import torch.nn.functional as F

from clipteacher.config import GLMConfig
from clipteacher.train.glm import CLSTokenBank, GlobalLearningModule


def test_attention_sums_to_one_and_peaks_on_the_matching_location():
    torch.manual_seed(0)
    glm = GlobalLearningModule(GLMConfig(), 8)
    feats = torch.randn(2, 8, 3, 4)
    cls = F.normalize(torch.randn(2, 8), dim=-1)
    feats[0, :, 1, 2] = cls[0] * 10  # strongly aligned location
    a = glm.attention(cls, feats)
    assert a.shape == (2, 3, 4)
    assert torch.allclose(a.sum(dim=(1, 2)), torch.ones(2), atol=1e-6)
    assert a[0].argmax() == 1 * 4 + 2


def test_pooled_cls_is_attention_weighted_sum():
    torch.manual_seed(1)
    glm = GlobalLearningModule(GLMConfig(), 4)
    feats, cls = torch.randn(1, 4, 2, 2), F.normalize(torch.randn(1, 4), dim=-1)
    scores = torch.stack([cls[0] @ feats[0, :, i, j] for i in range(2) for j in range(2)])
    w = torch.exp(scores) / torch.exp(scores).sum()
    expected = sum(w[k] * feats[0, :, k // 2, k % 2] for k in range(4))
    assert torch.allclose(glm.pool(cls, feats)[0], expected, atol=1e-6)


def test_info_nce_matches_hand_computation_with_bank():
    torch.manual_seed(2)
    cfg = GLMConfig(temperature=0.07, bank_size=3)
    glm = GlobalLearningModule(cfg, 4)
    bank = F.normalize(torch.randn(2, 4), dim=-1)
    glm.bank.push(bank)
    pred, cls = torch.randn(2, 4), F.normalize(torch.randn(2, 4), dim=-1)
    loss = glm.info_nce(pred, cls)
    keys = torch.cat([cls, bank])
    total = 0.0
    for b in range(2):
        p = pred[b] / pred[b].norm()
        sims = [math.exp(float(p @ k) / 0.07) for k in keys]
        total += -math.log(sims[b] / sum(sims))
    assert abs(float(loss) - total / 2) < 1e-4
    # loss computed before the push: the bank now holds the newest 3 tokens, oldest first
    assert torch.allclose(glm.bank.get(), torch.cat([bank[1:], cls]))


def test_bank_is_fifo():
    bank = CLSTokenBank(3, 1)
    for v in range(5):
        bank.push(torch.tensor([[float(v)]]))
    assert bank.get().flatten().tolist() == [2.0, 3.0, 4.0]
    bank.push(torch.tensor([[5.0], [6.0]]))
    assert bank.get().flatten().tolist() == [4.0, 5.0, 6.0]


def test_mean_and_max_pooling():
    feats = torch.arange(8.0).view(1, 2, 2, 2)
    cls = torch.ones(1, 2)
    assert torch.allclose(GlobalLearningModule(GLMConfig(pooling="mean"), 2).pool(cls, feats), torch.tensor([[1.5, 5.5]]))
    assert torch.allclose(GlobalLearningModule(GLMConfig(pooling="max"), 2).pool(cls, feats), torch.tensor([[3.0, 7.0]]))
