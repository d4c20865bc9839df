"""What the sites train on: Fashion-MNIST and its partitions (fashion_mnist), the byte-level text
of the char-LM tasks (text), a user's own image dataset (own_images), and the tasks that pair a
model with its data (tasks). ``from fedmoe.data import load_fashion_mnist, CLASS_NAMES`` keeps
working: the Fashion-MNIST names are re-exported here."""

from .fashion_mnist import (CLASS_NAMES, DEBIAN_DIR, DOMAINS, MEAN, STD, DataUnavailable, ImageSet, load_fashion_mnist,
                            load_global_test, load_site)

__all__ = ["CLASS_NAMES", "DEBIAN_DIR", "DOMAINS", "MEAN", "STD", "DataUnavailable", "ImageSet", "load_fashion_mnist",
           "load_global_test", "load_site"]
