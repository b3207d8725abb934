"""Your model, your data, a plain training script's state_dict: compressed end to end (digits stand in for your data).

python experiments/own_model.py [EPISODES]
"""

import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

import ajpq


class Net(nn.Module):  # a model AJPQ's zoo does not know: BatchNorm and a residual block
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2, self.fc = (
            nn.Conv2d(16, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.Linear(256, 10),
        )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(y)) + y), 2).flatten(1))


digits = load_digits()  # your own Dataset of (image, label) pairs; every 4th image for validation
data = torch.utils.data.TensorDataset(
    torch.tensor(digits.images).float().unsqueeze(1) / 16, torch.tensor(digits.target)
)
train, val = (torch.utils.data.Subset(data, [i for i in range(len(data)) if (i % 4 == 0) == v]) for v in (False, True))
torch.manual_seed(0)
model = Net()  # the plain training script
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for x, y in (batch for _ in range(10) for batch in torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
torch.save(model.state_dict(), "own_model.pt")

model = Net()  # compress it: search, fine-tune, export, load
model.load_state_dict(torch.load("own_model.pt"))
result = ajpq.search(model.eval(), train, val, size_budget=1 / 16, episodes=int(sys.argv[1]) if sys.argv[1:] else 300)
tuned = ajpq.finetune(model, result.best_policy, train, val, epochs=3)
report = ajpq.export(tuned, None, result.run_dir / "model.ajpq")
slim = ajpq.load_compressed(result.run_dir / "model.ajpq", model=Net())
print(f"{report['compression_rate']:.1f}x smaller, {report['file_bytes']:,} bytes; val accuracy {tuned.ajpq.after:.4f}")
