"""The network from the forum question "where should I put dropout in my CNN?", as its author wrote it.

Four stages, each conv -> max-pool -> ReLU -> batch norm followed by three 3x3 conv + ReLU layers,
then fc -> ReLU -> fc with log-softmax output, for 64x64 images. Its forward calls one conv layer
three times per stage (``self.conv11`` and friends) and one ``self.dropout`` twice, as in the
question. The widths are smaller than the question's so that a CPU run stays feasible.

Search where its dropout belongs:  autodrop search --config studies/forum.toml
List its candidate sites:          autodrop sites --model studies/forum_net.py:Net --image-size 64
"""

import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self, num_classes=10, in_channels=3, image_size=64, width=8):
        super(Net, self).__init__()
        w1, w2, w3, w4 = width, 2 * width, 4 * width, 8 * width
        self.pool = nn.MaxPool2d(2, 2)

        self.conv1 = nn.Conv2d(in_channels, w1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv11 = nn.Conv2d(w1, w1, 3, padding=1)

        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv21 = nn.Conv2d(w2, w2, 3, padding=1)

        self.conv3 = nn.Conv2d(w2, w3, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(w3)
        self.conv31 = nn.Conv2d(w3, w3, 3, padding=1)

        self.conv4 = nn.Conv2d(w3, w4, 3, padding=1)
        self.bn4 = nn.BatchNorm2d(w4)
        self.conv41 = nn.Conv2d(w4, w4, 3, padding=1)

        self.flat_features = w4 * (image_size // 16) ** 2
        self.fc1 = nn.Linear(self.flat_features, 128)
        self.fc2 = nn.Linear(128, num_classes)
        self.dropout = nn.Dropout(0.25)

    def forward(self, x):
        x = self.bn1(F.relu(self.pool(self.conv1(x))))
        x = F.relu(self.conv11(x))
        x = F.relu(self.conv11(x))
        x = F.relu(self.conv11(x))

        x = self.bn2(F.relu(self.pool(self.conv2(x))))
        x = F.relu(self.conv21(x))
        x = F.relu(self.conv21(x))
        x = F.relu(self.conv21(x))

        x = self.bn3(F.relu(self.pool(self.conv3(x))))
        x = F.relu(self.conv31(x))
        x = F.relu(self.conv31(x))
        x = F.relu(self.conv31(x))

        x = self.bn4(F.relu(self.pool(self.conv4(x))))
        x = F.relu(self.conv41(x))
        x = F.relu(self.conv41(x))
        x = F.relu(self.conv41(x))

        x = x.view(-1, self.flat_features)
        x = self.dropout(x)
        x = F.relu(self.fc1(x))
        x = self.dropout(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)
