"""samat.step in your own Accelerate loop: one SAM (or AT) step per call, mixed precision, DDP and gradient
accumulation handled by the engine (``accelerate launch sam_accelerate.py`` for several GPUs)."""
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

import samat

accelerator = Accelerator()
torch.manual_seed(0)
x = torch.randn(512, 20)
y = (x[:, 0] > 0).long()
loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

for epoch in range(5):
    for xb, yb in loader:
        # any model input names; "labels" is what the loss reads. A list of K batches accumulates K.
        result = samat.step(accelerator, model, optimizer, {"input": xb, "labels": yb}, method="sam", rho=0.05)
accelerator.print(f"loss {result.loss:.3f}")
