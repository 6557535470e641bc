"""pytorchexample: A Flower / PyTorch app.

As Flower's quickstart-pytorch task.py, with a tiny MLP on synthetic data (four Gaussian classes in 16
dimensions, IID partitions) in place of the CNN on CIFAR-10, so it runs offline in a second."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

FEATURES, CLASSES, SAMPLES = 16, 4, 1200


class Net(nn.Module):
    """A two-layer MLP."""

    def __init__(self):
        super(Net, self).__init__()
        self.fc1 = nn.Linear(FEATURES, 32)
        self.fc2 = nn.Linear(32, CLASSES)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _dataset(seed: int, n: int) -> TensorDataset:
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0)) * 2
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return TensorDataset(centres[labels] + torch.randn(n, FEATURES, generator=g), labels)


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    """Load this partition's share of the synthetic data: 80% train, 20% test."""
    data = _dataset(1 + partition_id, SAMPLES // num_partitions)
    n_train = int(0.8 * len(data))
    train, test = torch.utils.data.random_split(data, [n_train, len(data) - n_train],
                                                generator=torch.Generator().manual_seed(42))
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(test, batch_size=batch_size)


def load_centralized_dataset():
    """Load test set and return dataloader."""
    return DataLoader(_dataset(0, 400), batch_size=128)


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    avg_trainloss = running_loss / (epochs * len(trainloader))
    return avg_trainloss


def test(net, testloader, device):
    """Validate the model on the test set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in testloader:
            images, labels = images.to(device), labels.to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    accuracy = correct / len(testloader.dataset)
    loss = loss / len(testloader)
    return loss, accuracy
