"""SAM around any torch optimizer, in a plain PyTorch loop (a toy problem: the sign of the first feature)."""
import torch
import torch.nn.functional as F
from samat import SAM

torch.manual_seed(0)
x = torch.randn(512, 20)
y = (x[:, 0] > 0).long()
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.05)
for epoch in range(5):
    for xb, yb in zip(x.split(32), y.split(32)):
        def closure():  # forward + backward at the current weights; SAM runs it at w and at w + e
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss
        loss = opt.step(closure)
print(f"loss {loss:.3f}, train accuracy {(model(x).argmax(1) == y).float().mean():.2f}")
